//! Events pushed to clients (`{"ev": ...}` frames), and the JSON form of log entries.

use serde::Serialize;
use serde::ser::{SerializeMap, Serializer};
use serde_json::value::RawValue;

use crate::group::{Entry, Seq};
use crate::ids::{GroupId, UserId};
use crate::ticket::TicketEvent;

/// A pushed event. Pushes are best effort; `msg.sync` is the guarantee.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Msg { group: GroupId, entry: Entry },
    Receipt { group: GroupId, user: UserId, read_seq: Seq },
    Ticket(TicketEvent),
}

impl Event {
    /// The frame text, rendered once and shared by every connection it goes to.
    pub fn to_frame(&self) -> String {
        serde_json::to_string(self).expect("events always serialize")
    }

    /// When the message it pushes was committed, for push latency; other events have no
    /// single moment to measure from.
    pub fn committed_at(&self) -> Option<crate::Timestamp> {
        match self {
            Event::Msg { entry, .. } => Some(entry.ts),
            Event::Receipt { .. } | Event::Ticket(_) => None,
        }
    }
}

impl Serialize for Event {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Event::Msg { group, entry } => {
                let mut m = s.serialize_map(None)?;
                m.serialize_entry("ev", "msg")?;
                m.serialize_entry("group", group)?;
                write_entry_fields(&mut m, entry)?;
                m.end()
            }
            Event::Receipt { group, user, read_seq } => {
                let mut m = s.serialize_map(Some(4))?;
                m.serialize_entry("ev", "receipt")?;
                m.serialize_entry("group", group)?;
                m.serialize_entry("user", user)?;
                m.serialize_entry("read_seq", read_seq)?;
                m.end()
            }
            Event::Ticket(ev) => {
                #[derive(Serialize)]
                struct Tagged<'a> {
                    ev: &'static str,
                    #[serde(flatten)]
                    ticket: &'a TicketEvent,
                }
                Tagged { ev: "ticket", ticket: ev }.serialize(s)
            }
        }
    }
}

/// An entry as `msg.sync` returns it: `{seq, from, ts, client_msg_id, body, require_receipt}`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WireEntry<'a>(pub &'a Entry);

impl Serialize for WireEntry<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        write_entry_fields(&mut m, self.0)?;
        m.end()
    }
}

/// One line of a ticket's history as `ticket.get` returns it: `{seq, by, at, event}`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WireHistoryLine<'a>(pub &'a Entry);

impl Serialize for WireHistoryLine<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let e = self.0;
        let mut m = s.serialize_map(Some(4))?;
        m.serialize_entry("seq", &e.seq)?;
        m.serialize_entry("by", &e.from)?;
        m.serialize_entry("at", &e.ts)?;
        let event: &RawValue = serde_json::from_str(&e.body.json).map_err(serde::ser::Error::custom)?;
        m.serialize_entry("event", event)?;
        m.end()
    }
}

/// A list of entries in their protocol form.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WireEntries<'a>(pub &'a [Entry]);

impl Serialize for WireEntries<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(WireEntry))
    }
}

fn write_entry_fields<M: SerializeMap>(m: &mut M, e: &Entry) -> Result<(), M::Error> {
    m.serialize_entry("seq", &e.seq)?;
    m.serialize_entry("from", &e.from)?;
    m.serialize_entry("ts", &e.ts)?;
    if let Some(id) = &e.client_msg_id {
        m.serialize_entry("client_msg_id", id)?;
    }
    // Bodies are stored as validated JSON text: splice it in without re-encoding.
    let body: &RawValue = serde_json::from_str(&e.body.json).map_err(serde::ser::Error::custom)?;
    m.serialize_entry("body", body)?;
    m.serialize_entry("require_receipt", &e.require_receipt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::Body;
    use crate::entity::Timestamp;
    use crate::ids::ClientMsgId;

    #[test]
    fn msg_event_matches_the_protocol() {
        let body = Body::Text { text: "hi".into() }.validate(&crate::body::BodyLimits { max_text_chars: 10 }).unwrap();
        let entry = Entry {
            seq: 57,
            from: UserId::parse("u-17").unwrap(),
            ts: Timestamp(1795000000123),
            client_msg_id: Some(ClientMsgId::parse("a1b2c3").unwrap()),
            body,
            require_receipt: true,
        };
        let ev = Event::Msg { group: GroupId::parse("exc-1").unwrap(), entry };
        assert_eq!(
            ev.to_frame(),
            r#"{"ev":"msg","group":"exc-1","seq":57,"from":"u-17","ts":1795000000123,"client_msg_id":"a1b2c3","body":{"type":"text","text":"hi"},"require_receipt":true}"#
        );
    }
}
