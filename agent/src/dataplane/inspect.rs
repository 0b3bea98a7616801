//! What the kernel says is attached where, for `lbagent status`: the pinned links of this
//! network namespace, with each interface's name and XDP mode read back through netlink.

use futures::TryStreamExt as _;
use rtnetlink::packet_route::link::{LinkAttribute, LinkXdp, XdpAttached};
use serde::Serialize;

use super::{DataplaneError, PinLayout};

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Attachment {
    /// `None` when the interface is gone but its link is still pinned.
    pub interface: Option<String>,
    pub ifindex: u32,
    /// `driver`, `generic`, `offload`, `multiple`, or `none` (no XDP program at all).
    pub xdp: &'static str,
    /// Whether the tc egress counter is attached beside it.
    pub egress: bool,
}

pub async fn attachments(pins: &PinLayout) -> Result<Vec<Attachment>, DataplaneError> {
    let ns_path = "/proc/self/ns/net";
    let netns =
        std::os::linux::fs::MetadataExt::st_ino(&std::fs::metadata(ns_path).map_err(|source| {
            DataplaneError::Io {
                path: ns_path.into(),
                source,
            }
        })?);
    let mut egress = pins.pinned_tc_links()?;
    egress.extend(pins.pinned_tc_classic()?);
    let links: Vec<_> = pins
        .pinned_xdp_links()?
        .into_iter()
        .filter(|link| link.netns == netns)
        .collect();
    if links.is_empty() {
        return Ok(Vec::new());
    }
    let netlink_error = |err: std::io::Error| DataplaneError::Io {
        path: "netlink".into(),
        source: err,
    };
    let (connection, handle, _) = rtnetlink::new_connection().map_err(netlink_error)?;
    let connection = tokio::spawn(connection);
    let mut attachments = Vec::new();
    for link in links {
        let mut interface = None;
        let mut xdp = "none";
        let mut replies = handle.link().get().match_index(link.ifindex).execute();
        // An error here is the interface being gone: reported as such, not as a failure.
        while let Ok(Some(message)) = replies.try_next().await {
            for attribute in message.attributes {
                match attribute {
                    LinkAttribute::IfName(name) => interface = Some(name),
                    LinkAttribute::Xdp(xdp_attributes) => {
                        for attribute in xdp_attributes {
                            if let LinkXdp::Attached(mode) = attribute {
                                xdp = match mode {
                                    XdpAttached::None => "none",
                                    XdpAttached::Driver => "driver",
                                    XdpAttached::SocketBuffer => "generic",
                                    XdpAttached::Hardware => "offload",
                                    XdpAttached::Multiple => "multiple",
                                    _ => "unknown",
                                };
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        attachments.push(Attachment {
            interface,
            ifindex: link.ifindex,
            xdp,
            egress: egress.contains(&link),
        });
    }
    connection.abort();
    Ok(attachments)
}
