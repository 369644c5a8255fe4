//! The `refresh` semantics: parsing the parameter, deciding staleness, and planning what a request
//! does. Everything here is pure (no I/O, no clock reads) so it can be tested exhaustively.

pub mod mode;
pub mod plan;
pub mod staleness;

pub use mode::{RefreshMode, RefreshParam};
pub use plan::{
    fallback, plan, Background, CacheState, CalcReason, Fallback, Plan, Priority, Served, Shortfall, UpstreamRefresh,
    View,
};
pub use staleness::{Interval, StaleInfo, Thresholds};
