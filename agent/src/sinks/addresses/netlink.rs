//! Putting one address on a link and taking it off, as both the address sink and the
//! neighbours sink's kernel responder do.

use ipnet::IpNet;
use rtnetlink::{
    Handle,
    packet_route::{
        AddressFamily,
        address::{AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage},
    },
};
use tracing::debug;

use crate::sinks::errno;

/// Adds `net` to the link `index`; one already there counts as added (someone was faster:
/// the goal is met).
pub async fn add_address(handle: &Handle, index: u32, net: IpNet) -> Result<(), rtnetlink::Error> {
    let mut request = handle.address().add(index, net.addr(), net.prefix_len());
    // rtnetlink's builder makes a /32 its own broadcast address, which installs a `broadcast`
    // route for it beside its `local` one. These addresses are hosts, never broadcast ones.
    request
        .message_mut()
        .attributes
        .retain(|attr| !matches!(attr, AddressAttribute::Broadcast(_)));
    if net.addr().is_ipv6() {
        // The address is ours alone: duplicate address detection would only delay it.
        let message = request.message_mut();
        message.header.flags |= AddressHeaderFlags::Nodad;
        message
            .attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
    match request.execute().await {
        Err(err) if errno(&err) == Some(libc::EEXIST) => Ok(()),
        result => result,
    }
}

/// Removes `net` from the link `index`; one already gone counts as removed.
pub async fn remove_address(
    handle: &Handle,
    index: u32,
    net: IpNet,
) -> Result<(), rtnetlink::Error> {
    let mut message = AddressMessage::default();
    message.header.index = index;
    message.header.prefix_len = net.prefix_len();
    message.header.family = match net {
        IpNet::V4(_) => AddressFamily::Inet,
        IpNet::V6(_) => AddressFamily::Inet6,
    };
    message.attributes.push(AddressAttribute::Local(net.addr()));
    message
        .attributes
        .push(AddressAttribute::Address(net.addr()));
    match handle.address().del(message).execute().await {
        Err(err) if errno(&err) == Some(libc::EADDRNOTAVAIL) => {
            debug!(%net, "address was already gone");
            Ok(())
        }
        result => result,
    }
}
