//! One connection's membership as the registry holds it (pure): its value
//! (`{"v":1,"channel","key","info","since"}`, docs/protocol.md section 10), the `info` taken
//! from the connection's claims, and reading a value back.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::config::info_claim_path;
use crate::registry::keys::VALUE_VERSION;

/// Most bytes of a member's encoded `info`; above, it is `{}`.
pub const MAX_INFO_BYTES: usize = 1024;

/// Most bytes of a rendered member key; above, the connection is a member of its own.
pub const MAX_KEY_BYTES: usize = 256;

/// The value of `pres.<chan>.<relay>.<conn>`.
#[derive(Debug, Serialize)]
struct Written<'a> {
    v: u32,
    channel: &'a str,
    key: &'a str,
    info: &'a RawValue,
    since: u64,
}

/// What a reader needs of a value; unknown fields are ignored.
#[derive(Debug, Deserialize)]
struct Read<'a> {
    #[serde(borrow)]
    key: std::borrow::Cow<'a, str>,
    #[serde(default, borrow)]
    info: Option<&'a RawValue>,
}

/// The value of a membership: `key` with `info` (a JSON object's text) since `since` (ms).
pub fn value(channel: &str, key: &str, info: &str, since: u64) -> Vec<u8> {
    let info = RawValue::from_string(info.to_owned())
        .unwrap_or_else(|_| RawValue::from_string("{}".to_owned()).expect("valid JSON"));
    serde_json::to_vec(&Written {
        v: VALUE_VERSION,
        channel,
        key,
        info: &info,
        since,
    })
    .unwrap_or_default()
}

/// The member key and info (JSON object text) of a value; `None` when it is not one (a
/// reader skips it).
pub fn read(value: &[u8]) -> Option<(String, String)> {
    let r: Read<'_> = serde_json::from_slice(value).ok()?;
    let info = r
        .info
        .map(RawValue::get)
        .filter(|i| i.trim_start().starts_with('{'))
        .unwrap_or("{}");
    Some((r.key.into_owned(), info.to_owned()))
}

/// The `info` the binding's claim paths give: `{"name": "Alice"}` for `claims.name` (the
/// field is the path after `claims.`; an absent claim is left out), `{}` above
/// [`MAX_INFO_BYTES`] encoded.
pub fn info(claims: Option<&Map<String, Value>>, paths: &[String]) -> String {
    let mut out = Map::new();
    if let Some(claims) = claims {
        for entry in paths {
            let Some(path) = info_claim_path(entry) else {
                continue;
            };
            let found = path
                .iter()
                .try_fold(None::<&Value>, |at, seg| match at {
                    None => claims.get(*seg).map(Some),
                    Some(v) => v.as_object().and_then(|o| o.get(*seg)).map(Some),
                })
                .flatten();
            if let Some(v) = found.filter(|v| !v.is_null()) {
                out.insert(path.join("."), v.clone());
            }
        }
    }
    let text = Value::Object(out).to_string();
    if text.len() > MAX_INFO_BYTES {
        "{}".to_owned()
    } else {
        text
    }
}

/// The member key of a connection that cannot render the binding's: its own,
/// `<relay>/<connection id>` (the `Wsrelay-Connection` header).
pub fn own_key(relay: &str, conn: u64) -> String {
    format!("{relay}/{conn}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_value_is_versioned_and_read_back() {
        let v = value("rooms.7", "alice", r#"{"name":"Alice"}"#, 5);
        assert_eq!(
            serde_json::from_slice::<Value>(&v).unwrap(),
            json!({"v": 1, "channel": "rooms.7", "key": "alice", "info": {"name": "Alice"}, "since": 5})
        );
        assert_eq!(
            read(&v),
            Some(("alice".into(), r#"{"name":"Alice"}"#.into()))
        );
        // A later version's fields are ignored; a value without a key is skipped.
        assert_eq!(
            read(br#"{"v":2,"key":"b","info":[1],"more":true}"#),
            Some(("b".into(), "{}".into()))
        );
        assert_eq!(read(br#"{"v":1}"#), None);
        assert_eq!(read(b"not json"), None);
    }

    #[test]
    fn info_takes_the_named_claims_only_and_stays_small() {
        let claims = json!({"sub": "u1", "name": "Alice", "org": {"id": 7}, "secret": "x"});
        let claims = claims.as_object().unwrap();
        let paths = [
            "claims.name".to_owned(),
            "claims.org.id".into(),
            "claims.absent".into(),
        ];
        assert_eq!(
            serde_json::from_str::<Value>(&info(Some(claims), &paths)).unwrap(),
            json!({"name": "Alice", "org.id": 7})
        );
        assert_eq!(info(None, &paths), "{}");
        let big = json!({"name": "x".repeat(2000)});
        assert_eq!(info(big.as_object(), &paths), "{}");
    }
}
