//! Sinks: each owns one kind of kernel or daemon state and is the only code that changes it.

pub mod addresses;
pub mod dataplane;
pub mod routing;

/// What the kernel accepts as an interface name (IFNAMSIZ, no separators).
pub fn is_interface_name(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
}
