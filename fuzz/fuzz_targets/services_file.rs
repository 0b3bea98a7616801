//! The services file: any text is a desired state plus the entries it skipped (each with a
//! reason), or an error for the file as a whole; never a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    match lbagent::parse_services(text, Path::new("services.yaml")) {
        Ok(update) => {
            for rejected in &update.rejected {
                assert!(!rejected.reason.is_empty(), "{rejected:?} has no reason");
            }
        }
        Err(err) => assert!(!err.to_string().is_empty()),
    }
});
