//! Merge diagnostics over slices: task-vector norms, pairwise cosines, TIES sign conflicts,
//! sparsity and shared-zero fractions. Pure, no I/O. Being written (issue 4).
