//! The SSE event id of an auto-subscribed session (docs/protocol.md section 9): the last
//! position of each auto-subscribed resumable channel, `<channel>:<epoch>:<seq>` joined by
//! `,` (`notifications:17d2c3a94b1e0f00:1043`). EventSource sends the last one back as
//! `Last-Event-ID` when it reconnects by itself, and the new session resumes each channel
//! from it. Only channels named with letters, digits, `.`, `-`, `_` (every channel a gateway
//! admits) are carried.

use std::collections::{BTreeMap, HashMap};

use crate::protocol::Since;

/// Longest id read back.
pub const MAX_ID_BYTES: usize = 4096;
/// Most channels in one id.
const MAX_CHANNELS: usize = 64;

/// Why a `Last-Event-ID` (or `lastEventId`) is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadEventId {
    /// Over [`MAX_ID_BYTES`] or [`MAX_CHANNELS`] entries.
    #[error("too long")]
    TooLong,
    /// An entry that is not `<channel>:<epoch>:<seq>`.
    #[error("an entry is not <channel>:<epoch>:<seq>")]
    Entry,
    /// The same channel twice.
    #[error("a channel appears twice")]
    Twice,
}

/// Whether `channel` can travel in an id: 1 to 128 of letters, digits, `.`, `-`, `_`. Pure.
pub fn carries(channel: &str) -> bool {
    !channel.is_empty()
        && channel.len() <= 128
        && channel
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// The id for `positions` (channel to epoch and position). Pure.
pub fn encode(positions: &BTreeMap<String, (String, u64)>) -> String {
    positions
        .iter()
        .map(|(channel, (epoch, seq))| format!("{channel}:{epoch}:{seq}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The positions an id names; empty for an empty id. Pure.
pub fn decode(id: &str) -> Result<HashMap<String, Since>, BadEventId> {
    let mut out = HashMap::new();
    if id.is_empty() {
        return Ok(out);
    }
    if id.len() > MAX_ID_BYTES || id.split(',').count() > MAX_CHANNELS {
        return Err(BadEventId::TooLong);
    }
    for entry in id.split(',') {
        let mut parts = entry.split(':');
        let (Some(channel), Some(epoch), Some(seq), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(BadEventId::Entry);
        };
        let epoch_ok = !epoch.is_empty()
            && epoch.len() <= crate::protocol::MAX_TOKEN_FIELD
            && epoch.bytes().all(|b| b.is_ascii_alphanumeric());
        let seq = (!seq.is_empty() && seq.bytes().all(|b| b.is_ascii_digit()))
            .then(|| seq.parse::<u64>().ok())
            .flatten();
        let (true, true, Some(seq)) = (carries(channel), epoch_ok, seq) else {
            return Err(BadEventId::Entry);
        };
        let since = Since {
            epoch: epoch.to_owned(),
            seq,
        };
        if out.insert(channel.to_owned(), since).is_some() {
            return Err(BadEventId::Twice);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_names_each_channels_position_and_anything_else_is_refused() {
        let mut p = BTreeMap::new();
        p.insert(
            "notifications".to_owned(),
            ("17d2c3a94b1e0f00".to_owned(), 1043),
        );
        p.insert("alerts.v2".to_owned(), ("e9".to_owned(), 0));
        let id = encode(&p);
        assert_eq!(id, "alerts.v2:e9:0,notifications:17d2c3a94b1e0f00:1043");
        let back = decode(&id).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(
            back["notifications"],
            Since {
                epoch: "17d2c3a94b1e0f00".into(),
                seq: 1043
            }
        );
        assert!(decode("").unwrap().is_empty());
        for bad in [
            "n",
            "n:e",
            "n:e:1:2",
            ":e:1",
            "n::1",
            "n:e:",
            "n:e:-1",
            "n:e:+1",
            "n:e:1x",
            "n:e:99999999999999999999999",
            "n e:e:1",
            "n:e-1:1",
            "n:e:1,",
            "ü:e:1",
        ] {
            assert_eq!(decode(bad), Err(BadEventId::Entry), "{bad:?}");
        }
        assert_eq!(decode("n:e:1,n:e:2"), Err(BadEventId::Twice));
        assert_eq!(
            decode(&vec!["n:e:1"; 65].join(",")),
            Err(BadEventId::TooLong)
        );
        assert_eq!(
            decode(&format!("{}:e:1", "n".repeat(MAX_ID_BYTES))),
            Err(BadEventId::TooLong)
        );
        assert!(carries("a.b-c_d") && !carries("a:b") && !carries("a,b") && !carries(""));
    }
}
