//! The read side of permessage-deflate, in front of tungstenite: stock tungstenite (0.29, and
//! every release since) refuses any frame with RSV1 set, so a connection that negotiated
//! deflate reads its socket through `CompressedFrames`, which passes every frame through
//! untouched except a compressed message's, which it inflates (under the message limit) and
//! hands on as one plain frame. tungstenite still does everything else (masking rules, control
//! frames, fragmentation of plain messages, UTF-8, the close handshake); its own `FrameHeader`
//! parses and writes the headers, so the only framing written here is the walk from one frame
//! to the next. Pure: bytes in, bytes out, no socket.
//!
//! Chosen over the alternatives (ARCHITECTURE.md, "WebSocket compression"): a tungstenite fork
//! or yawc would replace the whole read path for one rare case (clients send short commands; a
//! browser compresses only those it judges worth it), and neither takes the pre-compressed
//! frames the fan-out shares; a reader of our own would redo what tungstenite does well.

use std::collections::VecDeque;
use std::io::Cursor;

use bytes::Bytes;
use tungstenite::protocol::frame::coding::{Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

use courtside_core::deflate::{InflateError, MessageInflater};

/// The longest frame header (RFC 6455 §5.2: 2 bytes, 8 of length, 4 of mask).
const MAX_HEADER: usize = 14;

/// Why the connection must end.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InflateRefusal {
    /// A compressed message (its compressed frames, or what they inflate to) is larger than the
    /// message limit: close 1009.
    #[error("compressed message larger than {0} bytes")]
    TooBig(usize),
    /// The client broke permessage-deflate's framing, or sent data that does not inflate:
    /// close 1002.
    #[error("{0}")]
    Protocol(&'static str),
}

impl From<InflateError> for InflateRefusal {
    fn from(error: InflateError) -> Self {
        match error {
            InflateError::TooBig(limit) => Self::TooBig(limit),
            InflateError::Corrupt => Self::Protocol("invalid compressed data"),
        }
    }
}

/// Where the walk through the client's bytes stands.
#[derive(Debug)]
enum Position {
    /// Reading a frame header (its bytes so far in `CompressedFrames::header`).
    Header,
    /// Passing this many payload bytes of a plain frame through.
    Plain(u64),
    /// Inflating this many payload bytes of a compressed message's frame.
    Compressed {
        left: u64,
        mask: [u8; 4],
        offset: usize,
        fin: bool,
    },
}

/// A compressed message whose frames are arriving.
#[derive(Debug)]
struct Message {
    opcode: OpCode,
    inflater: MessageInflater,
    /// Compressed payload bytes so far, bounded by the limit too.
    compressed: u64,
}

/// The filter over one connection's incoming bytes.
#[derive(Debug)]
pub struct CompressedFrames {
    limit: usize,
    position: Position,
    header: Vec<u8>,
    message: Option<Message>,
    /// A plain message is fragmented and not finished: a compressed one may not start.
    plain_fragmented: bool,
}

impl CompressedFrames {
    /// `limit`: the largest message, compressed or inflated (`--ws-max-message`).
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            position: Position::Header,
            header: Vec::new(),
            message: None,
            plain_fragmented: false,
        }
    }

    /// Takes bytes read from the socket, all of them, and appends what tungstenite should read
    /// to `out`: plain frames as they came, a compressed message as one plain frame once its
    /// last frame has arrived.
    pub fn feed(&mut self, mut input: &[u8], out: &mut VecDeque<Bytes>) -> Result<(), InflateRefusal> {
        while !input.is_empty() {
            match &mut self.position {
                Position::Header => {
                    let had = self.header.len();
                    let take = (MAX_HEADER - had).min(input.len());
                    self.header.extend_from_slice(&input[..take]);
                    let mut cursor = Cursor::new(&self.header[..]);
                    let parsed =
                        FrameHeader::parse(&mut cursor).map_err(|_| InflateRefusal::Protocol("bad frame header"))?;
                    let Some((header, length)) = parsed else {
                        input = &input[take..];
                        continue;
                    };
                    let header_len = cursor.position() as usize;
                    input = &input[header_len - had..];
                    self.header.truncate(header_len);
                    self.start_frame(header, length, out)?;
                    self.header.clear();
                }
                Position::Plain(left) => {
                    let take = input.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                    out.push_back(Bytes::copy_from_slice(&input[..take]));
                    input = &input[take..];
                    *left -= take as u64;
                    if *left == 0 {
                        self.position = Position::Header;
                    }
                }
                Position::Compressed {
                    left,
                    mask,
                    offset,
                    fin,
                } => {
                    let take = input.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                    let mut chunk = input[..take].to_vec();
                    for (i, byte) in chunk.iter_mut().enumerate() {
                        *byte ^= mask[(*offset + i) % 4];
                    }
                    input = &input[take..];
                    *left -= take as u64;
                    *offset += take;
                    let (done, fin) = (*left == 0, *fin);
                    let message = self.message.as_mut().ok_or(InflateRefusal::Protocol("no message"))?;
                    message.inflater.push(&chunk)?;
                    if done {
                        self.end_compressed_frame(fin, out)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Decides what to do with a frame whose header has just been read (in `self.header`).
    fn start_frame(
        &mut self,
        header: FrameHeader,
        length: u64,
        out: &mut VecDeque<Bytes>,
    ) -> Result<(), InflateRefusal> {
        let data = match header.opcode {
            OpCode::Data(data) => Some(data),
            OpCode::Control(_) => None,
        };
        let compressed_start = matches!(data, Some(Data::Text | Data::Binary)) && header.rsv1;
        match (&mut self.message, data) {
            (None, _) if compressed_start && !self.plain_fragmented => {
                if header.rsv2 || header.rsv3 {
                    return Err(InflateRefusal::Protocol("reserved bits 2 and 3 must be 0"));
                }
                self.message = Some(Message {
                    opcode: header.opcode,
                    inflater: MessageInflater::new(self.limit),
                    compressed: 0,
                });
            }
            (Some(_), Some(Data::Continue)) => {
                if header.rsv1 || header.rsv2 || header.rsv3 {
                    return Err(InflateRefusal::Protocol(
                        "RSV1 is set on the first frame of a message only",
                    ));
                }
            }
            (Some(_), Some(_)) => {
                return Err(InflateRefusal::Protocol(
                    "a new message before the end of a compressed one",
                ))
            }
            _ => {
                // Plain: tungstenite reads it (and refuses it if it breaks a rule).
                match data {
                    Some(Data::Text | Data::Binary) => self.plain_fragmented = !header.is_final,
                    Some(Data::Continue) if header.is_final => self.plain_fragmented = false,
                    _ => {}
                }
                out.push_back(Bytes::copy_from_slice(&self.header));
                self.position = if length == 0 {
                    Position::Header
                } else {
                    Position::Plain(length)
                };
                return Ok(());
            }
        }
        // A frame of a compressed message.
        let Some(mask) = header.mask else {
            return Err(InflateRefusal::Protocol("client frames must be masked"));
        };
        let message = self.message.as_mut().ok_or(InflateRefusal::Protocol("no message"))?;
        message.compressed = message.compressed.saturating_add(length);
        if message.compressed > self.limit as u64 {
            return Err(InflateRefusal::TooBig(self.limit));
        }
        self.position = Position::Compressed {
            left: length,
            mask,
            offset: 0,
            fin: header.is_final,
        };
        if length == 0 {
            self.end_compressed_frame(header.is_final, out)?;
        }
        Ok(())
    }

    /// After a compressed message's frame: on its last, hands tungstenite the whole message as
    /// one final frame, masked with the zero key (a valid mask that changes nothing).
    fn end_compressed_frame(&mut self, fin: bool, out: &mut VecDeque<Bytes>) -> Result<(), InflateRefusal> {
        self.position = Position::Header;
        if !fin {
            return Ok(());
        }
        let message = self.message.take().ok_or(InflateRefusal::Protocol("no message"))?;
        let payload = message.inflater.finish()?;
        let header = FrameHeader {
            is_final: true,
            rsv1: false,
            rsv2: false,
            rsv3: false,
            opcode: message.opcode,
            mask: Some([0; 4]),
        };
        let mut head = Vec::with_capacity(MAX_HEADER);
        header
            .format(payload.len() as u64, &mut head)
            .map_err(|_| InflateRefusal::Protocol("frame header"))?;
        out.push_back(Bytes::from(head));
        // An empty chunk would read as the end of the stream.
        if !payload.is_empty() {
            out.push_back(Bytes::from(payload));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use courtside_core::deflate::compress_message;

    /// A client frame: FIN as given, RSV1 as given, the opcode, masked with `mask`.
    fn frame(fin: bool, rsv1: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut out = vec![(u8::from(fin) << 7) | (u8::from(rsv1) << 6) | opcode];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xffff => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    fn run(filter: &mut CompressedFrames, input: &[u8], piece: usize) -> Result<Vec<u8>, InflateRefusal> {
        let mut out = VecDeque::new();
        for chunk in input.chunks(piece) {
            filter.feed(chunk, &mut out)?;
        }
        Ok(out.iter().flat_map(|b| b.iter().copied()).collect())
    }

    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    #[test]
    fn plain_frames_pass_through_unchanged() {
        let mut input = frame(true, false, 1, br#"{"type":"ping"}"#, MASK);
        input.extend(frame(true, false, 9, b"", MASK));
        input.extend(frame(false, false, 1, b"{\"ty", MASK));
        input.extend(frame(true, false, 0, b"pe\":\"ping\"}", MASK));
        for piece in [1, 3, input.len()] {
            assert_eq!(run(&mut CompressedFrames::new(1000), &input, piece), Ok(input.clone()));
        }
    }

    #[test]
    fn a_compressed_message_becomes_one_plain_frame_masked_with_zeros() {
        let command = br#"{"type":"subscribe","room":"game:1","pad":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"}"#;
        let compressed = compress_message(command).expect("compress");
        let (a, b) = compressed.split_at(compressed.len() / 2);
        // In one frame, then in two with a ping between them.
        let one = frame(true, true, 1, &compressed, MASK);
        let mut two = frame(false, true, 1, a, MASK);
        two.extend(frame(true, false, 9, b"p", MASK));
        two.extend(frame(true, false, 0, b, MASK));
        let mut expected = vec![0x81, 0x80 | command.len() as u8, 0, 0, 0, 0];
        expected.extend_from_slice(command);
        let ping = frame(true, false, 9, b"p", MASK);
        let mut expected_two = ping.clone();
        expected_two.extend_from_slice(&expected);
        for piece in [1, 5, 1000] {
            assert_eq!(run(&mut CompressedFrames::new(1000), &one, piece), Ok(expected.clone()));
            assert_eq!(
                run(&mut CompressedFrames::new(1000), &two, piece),
                Ok(expected_two.clone())
            );
        }
    }

    #[test]
    fn an_empty_compressed_message_is_an_empty_frame_and_no_empty_chunk() {
        let empty = compress_message(b"").expect("compress");
        let mut out = VecDeque::new();
        CompressedFrames::new(1000)
            .feed(&frame(true, true, 1, &empty, MASK), &mut out)
            .expect("feed");
        assert!(out.iter().all(|chunk| !chunk.is_empty()));
        let bytes: Vec<u8> = out.iter().flat_map(|b| b.iter().copied()).collect();
        assert_eq!(bytes, [0x81, 0x80, 0, 0, 0, 0]);
    }

    #[test]
    fn a_bomb_is_too_big() {
        let bomb = compress_message(&vec![b' '; 1 << 20]).expect("compress");
        let input = frame(true, true, 1, &bomb, MASK);
        assert_eq!(
            run(&mut CompressedFrames::new(64 << 10), &input, 4096),
            Err(InflateRefusal::TooBig(64 << 10))
        );
        // Compressed bytes past the limit are too big as well, before any is inflated.
        let header = frame(true, true, 1, &vec![0; 2000], MASK);
        assert_eq!(
            run(&mut CompressedFrames::new(1000), &header[..14], 14),
            Err(InflateRefusal::TooBig(1000))
        );
    }

    #[test]
    fn broken_compressed_framing_is_a_protocol_error() {
        let compressed = compress_message(b"{}").expect("compress");
        let mut rsv1_continuation = frame(false, true, 1, &compressed, MASK);
        rsv1_continuation.extend(frame(true, true, 0, b"", MASK));
        let mut new_message = frame(false, true, 1, &compressed, MASK);
        new_message.extend(frame(true, false, 1, b"{}", MASK));
        let mut unmasked = frame(true, true, 1, &compressed, MASK);
        unmasked[1] &= 0x7f;
        unmasked.drain(2..6);
        for (name, input) in [
            ("rsv1 on a continuation", rsv1_continuation),
            ("new message", new_message),
            ("unmasked", unmasked),
            ("garbage", frame(true, true, 1, &[0xff; 8], MASK)),
        ] {
            let result = run(&mut CompressedFrames::new(1000), &input, 3);
            assert!(matches!(result, Err(InflateRefusal::Protocol(_))), "{name}: {result:?}");
        }
    }

    /// What the fuzz target `websocket_deflate` checks, on seeded bytes: whatever a client
    /// sends, in pieces of any size, the filter passes it, hands on at most the limit, or
    /// refuses it, and never panics.
    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let compressed = compress_message(br#"{"type":"subscribe","room":"game:1"}"#).expect("compress");
        for _ in 0..2000 {
            // Valid frames with random bytes flipped, or random bytes alone.
            let mut input = frame(next() % 2 == 0, true, 1, &compressed, MASK);
            input.extend(frame(true, false, (next() % 16) as u8, b"x", MASK));
            if next() % 3 == 0 {
                input = (0..next() % 200).map(|_| next() as u8).collect();
            }
            for _ in 0..next() % 4 {
                let at = (next() as usize) % input.len().max(1);
                if let Some(byte) = input.get_mut(at) {
                    *byte ^= next() as u8;
                }
            }
            let piece = 1 + (next() % 20) as usize;
            if let Ok(out) = run(&mut CompressedFrames::new(256), &input, piece) {
                assert!(out.len() <= input.len() + 256 + 2 * MAX_HEADER, "{}", out.len());
            }
        }
    }

    #[test]
    fn rsv1_inside_a_plain_fragmented_message_is_left_to_tungstenite() {
        let mut input = frame(false, false, 1, b"{", MASK);
        input.extend(frame(true, true, 1, b"}", MASK));
        assert_eq!(run(&mut CompressedFrames::new(1000), &input, 2), Ok(input.clone()));
    }
}
