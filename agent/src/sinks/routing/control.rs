//! BIRD's control socket, spoken directly (no birdc).
//!
//! Framing, as BIRD's own client reads it: every line is `DDDD-text` (more follow), `DDDD
//! text` (the last line of the reply), ` text` (continues the previous code), or `+text`
//! (an asynchronous message, outside any reply). Codes from 8000 up are errors.

use std::{path::Path, time::Duration};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::UnixStream,
};
use tracing::info;

/// The most one reply may hold, read or still unread: `show protocols all` of a thousand
/// neighbours is a few MB. A reply that never ends is cut off here, not when memory runs out.
pub const MAX_REPLY_BYTES: usize = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("connecting to BIRD at {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("talking to BIRD: {0}")]
    Io(#[from] std::io::Error),
    #[error("BIRD closed the control connection")]
    Closed,
    #[error("BIRD sent a line its protocol does not allow: {0:?}")]
    Malformed(String),
    #[error("a command must be one line: {0:?}")]
    BadCommand(String),
    #[error("BIRD did not answer {command:?} within {timeout:?}")]
    Timeout { command: String, timeout: Duration },
    #[error("BIRD's reply is longer than the limit of {limit} bytes")]
    TooLong { limit: usize },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplyLine {
    pub code: u16,
    pub text: String,
}

/// One complete reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub lines: Vec<ReplyLine>,
}

impl Reply {
    /// The code of the last line, which is the reply's outcome.
    pub fn code(&self) -> u16 {
        self.lines.last().map_or(0, |l| l.code)
    }

    pub fn is_error(&self) -> bool {
        self.code() >= 8000
    }

    /// The last line's text: BIRD's message for the outcome.
    pub fn message(&self) -> &str {
        self.lines.last().map_or("", |l| l.text.as_str())
    }
}

/// Turns bytes, in chunks of any size, into replies and asynchronous messages.
#[derive(Debug, Default)]
pub struct Framer {
    buffer: Vec<u8>,
    current: Vec<ReplyLine>,
    /// The bytes read for `current`, newlines included.
    current_bytes: usize,
}

/// What a chunk of bytes completed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Framed {
    pub replies: Vec<Reply>,
    /// Asynchronous messages: BIRD's own news, outside any reply.
    pub messages: Vec<String>,
}

impl Framer {
    /// Feeds bytes; returns the replies and messages they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Framed, ControlError> {
        if self.buffer.len() + self.current_bytes + bytes.len() > MAX_REPLY_BYTES {
            return Err(ControlError::TooLong {
                limit: MAX_REPLY_BYTES,
            });
        }
        // Only the new bytes are searched, and the lines taken are drained once: a long
        // line arriving in small reads costs linear time, not quadratic.
        let mut searched = self.buffer.len();
        self.buffer.extend_from_slice(bytes);
        let mut taken = 0;
        let mut framed = Framed::default();
        let mut result = Ok(());
        while let Some(at) = self.buffer[searched..].iter().position(|b| *b == b'\n') {
            let end = searched + at;
            let line = String::from_utf8_lossy(&self.buffer[taken..end]).into_owned();
            taken = end + 1;
            searched = taken;
            if let Some(message) = line.strip_prefix('+') {
                framed.messages.push(message.to_owned());
                continue;
            }
            match self.line(line) {
                Ok(Some(reply)) => framed.replies.push(reply),
                Ok(None) => {}
                Err(err) => {
                    result = Err(err);
                    break;
                }
            }
        }
        self.buffer.drain(..taken);
        result.map(|()| framed)
    }

    fn line(&mut self, line: String) -> Result<Option<Reply>, ControlError> {
        let bytes = line.as_bytes();
        if let Some(text) = line.strip_prefix(' ') {
            let code = self
                .current
                .last()
                .map(|l| l.code)
                .ok_or_else(|| ControlError::Malformed(line.clone()))?;
            self.current_bytes += line.len() + 1;
            self.current.push(ReplyLine {
                code,
                text: text.to_owned(),
            });
            return Ok(None);
        }
        if bytes.len() >= 5
            && bytes[..4].iter().all(u8::is_ascii_digit)
            && matches!(bytes[4], b'-' | b' ')
        {
            let code: u16 = line[..4]
                .parse()
                .map_err(|_| ControlError::Malformed(line.clone()))?;
            self.current_bytes += line.len() + 1;
            self.current.push(ReplyLine {
                code,
                text: line[5..].to_owned(),
            });
            if bytes[4] == b' ' {
                self.current_bytes = 0;
                return Ok(Some(Reply {
                    lines: std::mem::take(&mut self.current),
                }));
            }
            return Ok(None);
        }
        Err(ControlError::Malformed(line))
    }
}

/// A connection to BIRD's control socket.
pub struct Control {
    stream: UnixStream,
    framer: Framer,
    pending: std::collections::VecDeque<Reply>,
    timeout: Duration,
}

impl Control {
    /// Connects and reads BIRD's greeting (`0001 BIRD x.y.z ready.`).
    pub async fn connect(path: &Path) -> Result<Self, ControlError> {
        Self::connect_within(path, Duration::from_secs(30)).await
    }

    /// Connects, and gives BIRD `timeout` to answer each command, the greeting included.
    /// The kernel accepts a connection for a BIRD that is stopped, so only the answer tells
    /// whether one is listening.
    pub async fn connect_within(path: &Path, timeout: Duration) -> Result<Self, ControlError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| ControlError::Connect {
                path: path.display().to_string(),
                source,
            })?;
        let mut control = Self {
            stream,
            framer: Framer::default(),
            pending: Default::default(),
            timeout,
        };
        let greeting = control.read_reply("(greeting)").await?;
        if greeting.code() != 1 {
            return Err(ControlError::Malformed(greeting.message().to_owned()));
        }
        Ok(control)
    }

    /// Sends one command and returns its reply.
    pub async fn command(&mut self, command: &str) -> Result<Reply, ControlError> {
        if command.contains(['\n', '\r']) || command.len() > 4000 {
            return Err(ControlError::BadCommand(command.to_owned()));
        }
        self.stream
            .write_all(format!("{command}\n").as_bytes())
            .await?;
        self.read_reply(command).await
    }

    async fn read_reply(&mut self, command: &str) -> Result<Reply, ControlError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(reply) = self.pending.pop_front() {
                return Ok(reply);
            }
            let read = tokio::time::timeout_at(deadline, self.stream.read(&mut chunk))
                .await
                .map_err(|_| ControlError::Timeout {
                    command: command.to_owned(),
                    timeout: self.timeout,
                })??;
            if read == 0 {
                return Err(ControlError::Closed);
            }
            let framed = self.framer.push(&chunk[..read])?;
            for message in framed.messages {
                info!(target: "bird", "{message}");
            }
            self.pending.extend(framed.replies);
        }
    }
}

/// One row of `show protocols`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProtocolStatus {
    pub name: String,
    pub proto: String,
    pub table: String,
    pub state: String,
    pub since: String,
    /// BGP's session state (`Established`, `Active`, ...) or an error; may hold spaces.
    pub info: String,
    /// Routes exported over all channels; only `show protocols all` tells, and only for a
    /// channel that is up.
    #[serde(default)]
    pub exported: u64,
    /// A channel reached its export limit (`routing.export.maxRoutes`): BIRD holds routes back.
    #[serde(default)]
    pub export_limit_hit: bool,
}

impl ProtocolStatus {
    /// A routing protocol that has neighbours (BGP, OSPF, RIP), as opposed to BIRD's own
    /// (device, direct, kernel, static, BFD).
    pub fn has_neighbours(&self) -> bool {
        matches!(self.proto.as_str(), "BGP" | "OSPF" | "RIP")
    }

    /// The one rule for "this protocol is up", used wherever lbagent decides it: BIRD says
    /// `up`, and a BGP session is established.
    pub fn is_up(&self) -> bool {
        self.state == "up" && (self.proto != "BGP" || self.info.starts_with("Established"))
    }
}

/// Parses a `show protocols` or `show protocols all` reply: a 1002 row per protocol, then
/// (with `all`) 1006 lines of details, of which only the channels' `Routes:` counts are used.
pub fn parse_protocols(reply: &Reply) -> Vec<ProtocolStatus> {
    let mut protocols: Vec<ProtocolStatus> = Vec::new();
    for line in &reply.lines {
        match line.code {
            1002 => protocols.extend(parse_protocol_row(line)),
            1006 if line.text.trim().starts_with("Export limit:") => {
                // `Export limit:   2 [HIT]` while the limit holds routes back.
                if let Some(protocol) = protocols.last_mut()
                    && line.text.trim_end().ends_with("[HIT]")
                {
                    protocol.export_limit_hit = true;
                }
            }
            1006 => {
                let exported = line
                    .text
                    .trim()
                    .strip_prefix("Routes:")
                    .and_then(|counts| {
                        counts
                            .split(',')
                            .find_map(|c| c.trim().strip_suffix(" exported"))
                    })
                    .and_then(|n| n.trim().parse::<u64>().ok());
                if let (Some(exported), Some(protocol)) = (exported, protocols.last_mut()) {
                    protocol.exported += exported;
                }
            }
            _ => {}
        }
    }
    protocols
}

fn parse_protocol_row(line: &ReplyLine) -> Option<ProtocolStatus> {
    let mut rest = line.text.as_str();
    let mut field = || {
        rest = rest.trim_start();
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        let (word, tail) = rest.split_at(end);
        rest = tail;
        (!word.is_empty()).then(|| word.to_owned())
    };
    let (name, proto, table, state, since) = (field()?, field()?, field()?, field()?, field()?);
    Some(ProtocolStatus {
        name,
        proto,
        table,
        state,
        since,
        info: rest.trim().to_owned(),
        exported: 0,
        export_limit_hit: false,
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// A transcript captured from BIRD 2.0.12 (shared/notes/bird-lab.md).
    const TRANSCRIPT: &[u8] = b"0001 BIRD 2.0.12 ready.\n\
2002-Name       Proto      Table      State  Since         Info\n\
1002-device1    Device     ---        up     01:48:57.349  \n \
lb         Direct     ---        up     01:48:57.349  \n \
rtr        BGP        ---        start  01:49:05.314  Received: Invalid network field   \n\
0000 \n\
+Config timeout expired, starting undo\n\
0002-Reading configuration from /x/bird.conf\n\
8002 /x/bird.conf:27:10 syntax error, unexpected CF_SYM_UNDEFINED\n\
0002-Reading configuration from /x/bird.conf\n\
0003 Reconfigured\n";

    fn frame_whole() -> (Vec<Reply>, Vec<String>) {
        let mut framer = Framer::default();
        let framed = framer.push(TRANSCRIPT).unwrap();
        (framed.replies, framed.messages)
    }

    #[test]
    fn frames_like_birds_client() {
        let (replies, asynchronous) = frame_whole();
        assert_eq!(replies.len(), 4);
        assert_eq!(replies[0].code(), 1);
        assert_eq!(replies[1].code(), 0);
        assert_eq!(replies[1].lines.len(), 5);
        assert_eq!(
            replies[1].lines[3].code, 1002,
            "a space-led line continues its code"
        );
        assert!(replies[2].is_error());
        assert_eq!(
            replies[2].message(),
            "/x/bird.conf:27:10 syntax error, unexpected CF_SYM_UNDEFINED"
        );
        assert_eq!(replies[3].code(), 3);
        assert!(!replies[3].is_error());
        assert_eq!(asynchronous, ["Config timeout expired, starting undo"]);
    }

    #[test]
    fn parses_show_protocols_with_spaces_in_info() {
        let (replies, _) = frame_whole();
        let protocols = parse_protocols(&replies[1]);
        assert_eq!(protocols.len(), 3);
        assert_eq!(protocols[1].name, "lb");
        assert_eq!(protocols[1].state, "up");
        assert_eq!(protocols[2].proto, "BGP");
        assert_eq!(protocols[2].state, "start");
        assert_eq!(protocols[2].info, "Received: Invalid network field");
    }

    #[test]
    fn sums_exported_routes_over_channels_from_show_protocols_all() {
        // Captured from BIRD 2.0.12, trimmed: a Static protocol with one channel up, and two
        // BGP sessions (one down, so its channels report no counts).
        let transcript = [
            "2002-Name       Proto      Table      State  Since         Info",
            "1002-s4         Static     master4    up     21:49:00.670  ",
            "1006-  Channel ipv4",
            "     State:          UP",
            "     Routes:         1 imported, 0 exported, 1 preferred",
            " ",
            "1002-peer1      BGP        ---        up     21:49:00.670  Established   ",
            "1006-  BGP state:          Established",
            "   Channel ipv4",
            "     Routes:         0 imported, 3 exported, 0 preferred",
            "   Channel ipv6",
            "     Routes:         0 imported, 2 exported, 0 preferred",
            " ",
            "1002-peer2      BGP        ---        start  21:49:00.670  Idle          ",
            "1006-  BGP state:          Idle",
            "   Channel ipv4",
            "     State:          DOWN",
            " ",
            "0000 ",
            "",
        ]
        .join("\n");
        let replies = Framer::default()
            .push(transcript.as_bytes())
            .unwrap()
            .replies;
        let protocols = parse_protocols(&replies[0]);
        let summary: Vec<_> = protocols
            .iter()
            .map(|p| {
                (
                    p.name.as_str(),
                    p.state.as_str(),
                    p.info.as_str(),
                    p.exported,
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("s4", "up", "", 0),
                ("peer1", "up", "Established", 5),
                ("peer2", "start", "Idle", 0)
            ]
        );
    }

    #[test]
    fn a_reply_that_never_ends_is_cut_off_at_the_limit() {
        let limit_error = |mut framer: Framer, chunk: &[u8]| {
            let mut fed = 0;
            loop {
                match framer.push(chunk) {
                    Ok(framed) => assert!(framed.replies.is_empty()),
                    Err(err) => return (err.to_string(), fed),
                }
                fed += chunk.len();
                assert!(fed <= MAX_REPLY_BYTES, "fed {fed} bytes and still reading");
            }
        };
        let lines = b"1002-a line of a reply that goes on and on\n".repeat(100);
        let (err, fed) = limit_error(Framer::default(), &lines);
        assert_eq!(
            err,
            "BIRD's reply is longer than the limit of 16777216 bytes"
        );
        assert!(fed > MAX_REPLY_BYTES - lines.len(), "{fed}");
        // One line with no end, too.
        let (err, _) = limit_error(Framer::default(), &[b'x'; 4096]);
        assert!(err.contains("limit of 16777216 bytes"), "{err}");
        // Replies that end do not add up.
        let mut framer = Framer::default();
        let reply = b"1002-row\n".repeat(1000);
        for _ in 0..(2 * MAX_REPLY_BYTES / reply.len()) {
            framer.push(&reply).unwrap();
            assert_eq!(framer.push(b"0000 \n").unwrap().replies.len(), 1);
        }
    }

    #[test]
    fn a_line_outside_the_protocol_is_an_error() {
        assert!(Framer::default().push(b"hello\n").is_err());
        assert!(Framer::default().push(b" orphan continuation\n").is_err());
        assert!(Framer::default().push(b"12x4 nope\n").is_err());
    }

    proptest! {
        /// Any chunking of the byte stream frames to the same replies.
        #[test]
        fn chunking_does_not_change_framing(cuts in proptest::collection::vec(0..TRANSCRIPT.len(), 0..20)) {
            let mut cuts = cuts;
            cuts.sort_unstable();
            let mut framer = Framer::default();
            let mut replies = Vec::new();
            let mut messages = Vec::new();
            let mut start = 0;
            for cut in cuts.into_iter().chain([TRANSCRIPT.len()]) {
                let framed = framer.push(&TRANSCRIPT[start..cut]).unwrap();
                replies.extend(framed.replies);
                messages.extend(framed.messages);
                start = cut;
            }
            let (whole, asynchronous) = frame_whole();
            prop_assert_eq!(replies, whole);
            prop_assert_eq!(messages, asynchronous);
        }

        /// Arbitrary bytes never panic the framer.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Framer::default().push(&bytes);
        }
    }
}
