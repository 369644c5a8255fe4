//! The front door: connections, the decision about each request, the proxy's own answers and
//! pingora's pass-through hooks.
//!
//! - [`conn`]: the listening app ([`FastPath`]): pingora's HTTP/1 connection loop with the proxy's
//!   own answers written directly; bodies and pass-through to pingora's proxy, HTTP/2 to `h2`.
//! - `h2`: pingora's HTTP/2 connection loop, with the proxy's own answers written without
//!   pingora_proxy's per-request session; everything else to pingora's proxy.
//! - `listener`: the port's listening socket and accept loop, each connection a task of its
//!   own running [`FastPath`].
//! - [`framing`]: unambiguous body framing and a well-formed authority, checked first.
//! - `decide`: what the proxy does with a request (refuse, answer, pass through).
//! - `request`: what the decision reads of a request, and the fast path's in-place parse of a
//!   one-read GET head.
//! - `head`: the one builder of an own answer's response head, for both writers.
//! - `answer`: own answers and failures written to pingora's session.
//! - `ctx`: a request's state, and its metrics and access log line at the end.
//! - [`proxy`]: the pingora `ProxyHttp` hooks of the pass-through path.

mod answer;
pub mod conn;
mod ctx;
mod decide;
pub mod framing;
mod h2;
mod head;
mod listener;
pub mod proxy;
mod request;

pub use answer::write_reply;
pub use conn::FastPath;
pub use ctx::RequestCtx;
pub use decide::{MAX_REQUEST_HEADERS, MAX_REQUEST_HEADER_BYTES, MAX_URI_BYTES};
pub use head::InvalidHead;
pub use listener::Listening;
pub use proxy::InsightsProxy;
