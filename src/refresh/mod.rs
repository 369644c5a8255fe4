//! The `refresh` semantics: parsing the parameter, deciding staleness, and choosing what to do.
//! Everything here is pure (no I/O, no clock reads) so it can be tested exhaustively.

pub mod mode;
pub mod policy;
pub mod staleness;

pub use mode::{RefreshMode, RefreshParam};
pub use policy::{decide, Background, CacheState, Decision, UpstreamRefresh};
pub use staleness::{Interval, StaleInfo, Thresholds};
