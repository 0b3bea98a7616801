//! The agent's config file (`lbagent.yaml`): any text is either a config or an error that
//! names what is wrong, never a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let path = Path::new("/etc/lbagent/lbagent.yaml");
    match lbagent::Config::parse(text, path, Some("node-a")) {
        Ok(config) => {
            // Deterministic: the same text gives the same config.
            let again = lbagent::Config::parse(text, path, Some("node-a"))
                .expect("parsed once, parses again");
            assert_eq!(format!("{config:?}"), format!("{again:?}"));
        }
        Err(err) => assert!(!err.to_string().is_empty()),
    }
});
