//! The routing sink's plan: the BIRD config the wanted routing section renders to, when it is
//! not the one BIRD was last handed. Pure, so tests drive it directly.

use std::net::Ipv4Addr;

use super::{
    model::{IfaceName, RoutingConfig},
    render::render_for_mode,
};

/// The config to hand BIRD, or `None` when it already has it (or there is nothing to render:
/// no routing section, or no router id to render with).
pub fn plan(
    wanted: Option<&RoutingConfig>,
    router_id_default: Option<Ipv4Addr>,
    interface: &IfaceName,
    handed: &str,
) -> Option<String> {
    let config = wanted?;
    let router_id = config.router_id.or(router_id_default)?;
    let text = render_for_mode(config, router_id, interface);
    (text != handed).then_some(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::routing::model::RawRouting;

    fn config(yaml: &str) -> RoutingConfig {
        let raw: RawRouting = crate::yaml::from_str(yaml, crate::config::LIMITS).unwrap();
        raw.validate().unwrap()
    }

    #[test]
    fn only_a_config_bird_does_not_have_is_handed_over() {
        let interface = IfaceName::new("kube-lb0", "interface").unwrap();
        let id = Some(Ipv4Addr::new(10, 0, 0, 1));
        let one = config("bgp: [{neighbor: 10.0.0.2, asn: 64500, localAsn: 64512}]");
        let text = plan(Some(&one), id, &interface, "").expect("a first config");
        assert!(text.contains("64500"), "{text}");
        assert_eq!(plan(Some(&one), id, &interface, &text), None);
        let two = config("bgp: [{neighbor: 10.0.0.2, asn: 64501, localAsn: 64512}]");
        assert!(plan(Some(&two), id, &interface, &text).is_some_and(|t| t.contains("64501")));
        assert_eq!(plan(None, id, &interface, &text), None);
        assert_eq!(plan(Some(&one), None, &interface, ""), None, "no router id");
    }
}
