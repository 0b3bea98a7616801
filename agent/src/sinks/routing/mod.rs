//! The routing sink: a BIRD that advertises kube-lb0's addresses. lbagent renders BIRD's
//! config from its own, checks it, and reloads BIRD over its control socket; in managed mode
//! it also runs and supervises BIRD. Address changes never reach this sink: BIRD's direct
//! protocol follows kube-lb0 by itself.

pub mod control;
pub mod model;
pub mod render;
