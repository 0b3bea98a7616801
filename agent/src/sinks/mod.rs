//! Sinks: each owns one kind of kernel or daemon state and is the only code that changes it.

pub mod addresses;
pub mod dataplane;
pub mod neighbours;
pub mod routing;
