//! A reader of the NATS client protocol as nats-server sends it over WebSocket: the stream is
//! cut into frames anywhere, so bytes are buffered until a whole operation is there.

/// One server operation the benchmark client cares about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Info,
    Ping,
    Pong,
    Ok,
    Err(String),
    /// A delivered message's payload.
    Msg(Vec<u8>),
}

/// Buffers bytes and yields whole operations.
#[derive(Debug, Default)]
pub struct Reader {
    buf: Vec<u8>,
}

impl Reader {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole operation, or `None` until more bytes arrive.
    pub fn next_op(&mut self) -> Option<Op> {
        loop {
            let eol = super::find(&self.buf, b"\r\n")?;
            let line = &self.buf[..eol];
            let upper: Vec<u8> = line
                .iter()
                .take(4)
                .map(|b| b.to_ascii_uppercase())
                .collect();
            let op = match upper.as_slice() {
                b"MSG " => {
                    let size: usize = std::str::from_utf8(line)
                        .ok()
                        .and_then(|l| l.split_whitespace().last())
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0);
                    let start = eol + 2;
                    if self.buf.len() < start + size + 2 {
                        return None;
                    }
                    let payload = self.buf[start..start + size].to_vec();
                    self.buf.drain(..start + size + 2);
                    return Some(Op::Msg(payload));
                }
                b"PING" => Some(Op::Ping),
                b"PONG" => Some(Op::Pong),
                b"+OK" => Some(Op::Ok),
                b"INFO" => Some(Op::Info),
                b"-ERR" => Some(Op::Err(String::from_utf8_lossy(line).into_owned())),
                _ if upper.starts_with(b"+OK") => Some(Op::Ok),
                _ => None,
            };
            self.buf.drain(..eol + 2);
            if op.is_some() {
                return op;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_split_across_frames() {
        let mut r = Reader::default();
        r.push(b"INFO {\"server_id\":\"x\"}\r\nPI");
        assert_eq!(r.next_op(), Some(Op::Info));
        assert_eq!(r.next_op(), None);
        r.push(b"NG\r\nMSG bench.all 1 5\r\nhel");
        assert_eq!(r.next_op(), Some(Op::Ping));
        assert_eq!(r.next_op(), None);
        r.push(b"lo\r\nMSG a.b 2 reply.x 2\r\n\r\n\r\nPONG\r\n-ERR 'Authorization Violation'\r\n");
        assert_eq!(r.next_op(), Some(Op::Msg(b"hello".to_vec())));
        assert_eq!(r.next_op(), Some(Op::Msg(b"\r\n".to_vec())));
        assert_eq!(r.next_op(), Some(Op::Pong));
        assert_eq!(
            r.next_op(),
            Some(Op::Err("-ERR 'Authorization Violation'".into()))
        );
        assert_eq!(r.next_op(), None);
    }
}
