//! The neighbours sink: local addresses (inside a subnet of the node's interfaces) are
//! reached through ARP and IPv6 neighbour discovery, and exactly one node must answer for
//! each. This sink elects that node and keeps the XDP responder's map as the election says.

pub mod announce;
pub mod election;
