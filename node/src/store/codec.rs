//! How values are laid out on disk: a format version byte, then bincode 2 (serde mode).
//! Decoding never panics: a value from another version, or corrupt bytes, is an error
//! that names what could not be read.

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::StoreError;

/// Bumped whenever a stored type changes shape.
pub const FORMAT_VERSION: u8 = 3;

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = vec![FORMAT_VERSION];
    bincode::serde::encode_into_std_write(value, &mut out, config()).expect("writing into a Vec cannot fail");
    out
}

pub fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, StoreError> {
    match bytes.split_first() {
        Some((&FORMAT_VERSION, rest)) => {
            let (value, used) = bincode::serde::decode_from_slice(rest, config())
                .map_err(|e| StoreError::Corrupt { what, detail: e.to_string() })?;
            if used != rest.len() {
                return Err(StoreError::Corrupt { what, detail: format!("{} trailing bytes", rest.len() - used) });
            }
            Ok(value)
        }
        Some((v, _)) => {
            Err(StoreError::Corrupt { what, detail: format!("format version {v}, this build reads {FORMAT_VERSION}") })
        }
        None => Err(StoreError::Corrupt { what, detail: "empty value".into() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_garbage() {
        let v = (7u64, "seven".to_string(), Some(vec![1u8, 2]));
        assert_eq!(decode::<(u64, String, Option<Vec<u8>>)>("t", &encode(&v)).unwrap(), v);
        assert!(decode::<u64>("t", &[]).is_err());
        assert!(decode::<u64>("t", &[9, 1]).is_err());
        assert!(decode::<String>("t", &[FORMAT_VERSION, 200, 1]).is_err());
        let mut long = encode(&1u8);
        long.push(0);
        assert!(decode::<u8>("t", &long).is_err());
    }

    /// The binary encoding cannot hold skipped or flattened fields: every replicated
    /// type must come back as it went in.
    #[test]
    fn every_replicated_ticket_type_round_trips() {
        use convoy_actors::domain::{Command, EntityState};
        use convoy_actors::ticket::{TicketCommand, TicketState};
        use convoy_actors::{EntityKey, Timestamp};
        let cfg = convoy_actors::domain::DomainConfig::default();
        let who =
            convoy_actors::principal::Principal::from_claims("c-1", &["customer".into()], &[], Some("vip")).unwrap();
        let fields = serde_json::from_str(r#"{"subject":"运费","group":"g-1","ticket":"t-1"}"#).unwrap();
        let route = convoy_actors::ops::parse("ticket.open", &fields, &who, &cfg, |p| p.to_string()).unwrap();
        let convoy_actors::ops::Route::Actor {
            request: convoy_actors::behavior::Request::OpenTickets { tickets, .. },
            ..
        } = route
        else {
            panic!("{route:?}")
        };
        let (id, open) = tickets[0].clone();
        let mut state = None;
        let applied = TicketState::apply(&mut state, &id, TicketCommand::Open(open.clone()), Timestamp(5));
        assert!(applied.reply.is_ok());
        let cmd = Command::Ticket(TicketCommand::Open(open));
        assert_eq!(decode::<Command>("cmd", &encode(&cmd)).unwrap(), cmd);
        let state = EntityState::Ticket(state.unwrap());
        assert_eq!(decode::<EntityState>("state", &encode(&state)).unwrap(), state);
        let EntityState::Ticket(t) = &state else { unreachable!() };
        let update = Command::Queue(convoy_actors::queue::QueueCommand::Update { rev: 1, summary: t.summary(&id) });
        assert_eq!(decode::<Command>("update", &encode(&update)).unwrap(), update);
        let reply: Result<convoy_actors::domain::Reply, convoy_actors::Rejection> =
            Err(convoy_actors::Rejection::forbidden("no"));
        assert_eq!(
            decode::<Result<convoy_actors::domain::Reply, convoy_actors::Rejection>>("r", &encode(&reply)).unwrap(),
            reply
        );
        let _ = EntityKey::Ticket(id);
    }
}
