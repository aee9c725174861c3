//! How a generalized-task-arithmetic method sparsifies each task vector (the kernels in
//! [`super::gta`] and the method definitions in `crate::methods::gta` both name it).

use serde::{Deserialize, Serialize};

/// How a GTA method sparsifies each task vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sparsification {
    None,
    /// Keep the `density` share of largest `|δ|` (TIES).
    Magnitude,
    /// Drop the `gamma` share of largest `|δ|` and the smallest down to `density` (breadcrumbs).
    MagnitudeOutliers,
    /// Keep each element with probability `density` (DARE).
    Random,
    /// Keep with a probability ranked by magnitude per row (DELLA).
    DellaMagprune,
}
