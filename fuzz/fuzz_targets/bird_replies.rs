//! BIRD's control socket: whatever bytes arrive, in chunks of any size, the framer returns
//! replies or names the malformed line, and `show protocols` parsing never panics.
#![no_main]

use lbagent::fuzzing::{Framed, Framer, parse_protocols};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte chooses the chunk size the bytes arrive in; the rest is the stream.
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);

    let mut whole = Framer::default();
    let at_once = whole.push(stream);

    let mut framer = Framer::default();
    let mut in_chunks = Ok(Framed::default());
    for piece in stream.chunks(chunk) {
        match framer.push(piece) {
            Ok(framed) => {
                if let Ok(all) = &mut in_chunks {
                    all.replies.extend(framed.replies);
                    all.messages.extend(framed.messages);
                }
            }
            Err(err) => {
                in_chunks = Err(err);
                break;
            }
        }
    }

    match (&at_once, &in_chunks) {
        // How the bytes were split never changes what they mean.
        (Ok(a), Ok(b)) => assert_eq!(a, b),
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
        _ => panic!("split into {chunk}-byte chunks: {in_chunks:?}, at once: {at_once:?}"),
    }
    for reply in at_once.iter().flat_map(|framed| &framed.replies) {
        let _ = (reply.code(), reply.is_error(), reply.message());
        for protocol in parse_protocols(reply) {
            assert!(!protocol.name.is_empty());
        }
    }
});
