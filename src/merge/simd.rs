//! Kernels compiled for wider vectors where the CPU has them, picked at run time.
//!
//! [`run`] calls a closure through a function compiled with AVX2 enabled (x86_64, when the CPU
//! reports it), so the closure's body and what it inlines use 256-bit vectors instead of the
//! baseline's 128-bit SSE2; elsewhere it just calls the closure. Only AVX2 is enabled, not FMA,
//! and Rust never fuses a multiply and an add by itself: IEEE `+ − × ÷`, comparisons and bit
//! operations give the same bits either way, so outputs do not depend on the CPU. [`run_wide`]
//! does the same with AVX-512 for integer kernels.
//!
//! The closure only gets the wider vectors if it is inlined into that function: LLVM may instead
//! compile a large closure as a function of its own, without the target features (a profile
//! showed `gta::combine`'s closure running as SSE2 code that way). Callers with a large body
//! mark the closure `#[inline(always)]`, as the span drivers in `blocks.rs` and `gta.rs` do.

/// `f()`, compiled for AVX2 when the CPU supports it.
#[inline(always)]
pub fn run<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe { run_avx2(f) };
        }
    }
    f()
}

/// `f()`, compiled for AVX-512 (F, DQ, VL, BW) when the CPU supports it, else as [`run`]: for
/// integer kernels that multiply 64-bit lanes (the keyed generator's draws), which only
/// AVX-512 DQ has as one instruction.
#[inline(always)]
pub fn run_wide<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512bw")
        {
            // SAFETY: the CPU supports these features (checked just above).
            return unsafe { run_avx512(f) };
        }
    }
    run(f)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx512vl,avx512bw")]
#[inline]
fn run_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
fn run_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(test)]
mod tests {
    #[test]
    fn same_bits_as_the_plain_call() {
        let xs: Vec<f32> = (0..10_000).map(|i| (i as f32 * 0.37).sin() * 1e3).collect();
        let kernel = |xs: &[f32]| -> Vec<u32> {
            xs.iter()
                .map(|x| (x * 1.7 + 0.3 - x / 3.0).to_bits())
                .collect()
        };
        assert_eq!(super::run(|| kernel(&xs)), kernel(&xs));
        assert_eq!(super::run_wide(|| kernel(&xs)), kernel(&xs));
        let rng = crate::merge::rng::KeyedRng::new(7, 1, "t");
        let draws = |n: u64| (0..n).map(|e| rng.bits(e)).collect::<Vec<u64>>();
        assert_eq!(super::run_wide(|| draws(10_000)), draws(10_000));
    }
}
