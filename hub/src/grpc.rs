//! The gRPC edge: the agent stream ([`agent`]), the operator API
//! ([`admin`]) and the conversions between prost and domain types
//! ([`convert`]). Errors become statuses only through
//! `From<HubError> for Status`.

pub mod admin;
pub mod agent;
pub mod convert;
mod watch;
