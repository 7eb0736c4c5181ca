//! The operations of protocol v1 that reach entities, parsed from a request frame's fields
//! into typed requests. `hello` and `ping` belong to the connection and are handled by the
//! gateway before anything here runs.

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::behavior::{Request, TicketFilter};
use crate::body::{Body, MemberSpec};
use crate::domain::{DomainConfig, Query};
use crate::entity::EntityKey;
use crate::error::{Limit, Rejection};
use crate::group::{
    self, ExceptionType, GroupCommand, GroupKind, MAX_RESOLUTION_CHARS, MemberRole, OpenGroup, SendMessage, Seq,
};
use crate::ids::{ClientMsgId, GroupId, SkillGroup, TicketId, UserId};
use crate::principal::Principal;
use crate::ticket::{self, OpenTicket, TicketCommand, TicketStatus};

/// Where a parsed operation goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Route {
    /// To the entity's actor on its shard leader.
    Actor { key: EntityKey, request: Request },
    /// A read served from the entity's committed state on its shard leader.
    Query { key: EntityKey, query: Query },
}

impl Route {
    pub fn key(&self) -> &EntityKey {
        match self {
            Route::Actor { key, .. } | Route::Query { key, .. } => key,
        }
    }
}

/// Every op this module parses, for `bad_request` messages and docs.
pub const OPS: &[&str] = &[
    "group.open",
    "group.invite",
    "group.remove",
    "group.leave",
    "group.close",
    "group.info",
    "msg.send",
    "msg.sync",
    "msg.read",
    "msg.receipts",
    "inbox.sync",
    "ticket.open",
    "ticket.get",
    "ticket.list",
    "ticket.claim",
    "ticket.reply",
    "ticket.propose",
    "ticket.confirm",
    "ticket.escalate",
    "ticket.rate",
    "ticket.close",
];

fn args<T: DeserializeOwned>(op: &str, fields: &Map<String, Value>) -> Result<T, Rejection> {
    T::deserialize(fields).map_err(|e| Rejection::bad_request(format!("{op}: {e}")))
}

#[derive(Deserialize)]
struct GroupArg {
    group: GroupId,
}

#[derive(Deserialize)]
struct OpenArgs {
    group: Option<GroupId>,
    kind: GroupKind,
    #[serde(default)]
    title: String,
    order_id: Option<String>,
    exception_type: Option<ExceptionType>,
    #[serde(default)]
    members: Vec<MemberSpec>,
}

#[derive(Deserialize)]
struct InviteArgs {
    group: GroupId,
    user: UserId,
    role: MemberRole,
}

#[derive(Deserialize)]
struct UserArgs {
    group: GroupId,
    user: UserId,
}

#[derive(Deserialize)]
struct CloseArgs {
    group: GroupId,
    #[serde(default)]
    resolution: String,
}

#[derive(Deserialize)]
struct SendArgs {
    group: GroupId,
    client_msg_id: ClientMsgId,
    body: Body,
    #[serde(default)]
    require_receipt: bool,
}

#[derive(Deserialize)]
struct SyncArgs {
    group: GroupId,
    #[serde(default)]
    after: Seq,
    limit: Option<u32>,
}

#[derive(Deserialize)]
struct SeqArgs {
    group: GroupId,
    seq: Seq,
}

#[derive(Deserialize)]
struct TicketOpenArgs {
    subject: String,
    #[serde(default)]
    description: String,
    order_id: Option<String>,
    group: Option<GroupId>,
    ticket: Option<TicketId>,
}

#[derive(Deserialize)]
struct TicketArg {
    ticket: TicketId,
}

#[derive(Deserialize)]
struct TicketGetArgs {
    ticket: TicketId,
    history_limit: Option<u32>,
}

#[derive(Deserialize)]
struct TicketTextArgs {
    ticket: TicketId,
    text: String,
}

#[derive(Deserialize)]
struct TicketProposeArgs {
    ticket: TicketId,
    solution: String,
}

#[derive(Deserialize)]
struct TicketConfirmArgs {
    ticket: TicketId,
    accepted: bool,
}

#[derive(Deserialize)]
struct TicketEscalateArgs {
    ticket: TicketId,
    reason: String,
}

#[derive(Deserialize)]
struct TicketRateArgs {
    ticket: TicketId,
    score: u8,
    #[serde(default)]
    comment: String,
}

#[derive(Deserialize)]
struct TicketListArgs {
    state: Option<TicketStatus>,
    skill_group: Option<SkillGroup>,
    assignee: Option<UserId>,
}

/// `text` is 1..=`max` characters (`allow_empty`: 0 is fine too).
fn text_arg(op: &str, name: &str, text: &str, max: usize, allow_empty: bool) -> Result<(), Rejection> {
    let len = text.chars().count();
    if (!allow_empty && text.trim().is_empty()) || len > max {
        let least = if allow_empty { 0 } else { 1 };
        return Err(Rejection::bad_request(format!("{op}: {name} must be {least} to {max} characters, got {len}")));
    }
    Ok(())
}

/// The ids of the tickets one open creates: the client's id (then `id.2`, `id.3`, ... for
/// further categories), or fresh ones.
fn ticket_ids(
    given: Option<TicketId>,
    n: usize,
    fresh_id: &mut impl FnMut(&str) -> String,
) -> Result<Vec<TicketId>, Rejection> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let id = match (&given, i) {
            (Some(t), 0) => t.clone(),
            (Some(t), i) => TicketId::parse(&format!("{t}.{}", i + 1)).map_err(|e| {
                Rejection::bad_request(format!(
                    "ticket.open: the text opens {n} tickets and {t}.{} is no ticket id: {e}",
                    i + 1
                ))
            })?,
            (None, _) => TicketId::parse(&fresh_id("t")).expect("generated ids use the id grammar"),
        };
        ids.push(id);
    }
    Ok(ids)
}

/// Parses `op` with the frame's other fields. `fresh_group_id` names a group the client
/// did not name.
pub fn parse(
    op: &str,
    fields: &Map<String, Value>,
    who: &Principal,
    cfg: &DomainConfig,
    mut fresh_id: impl FnMut(&str) -> String,
) -> Result<Route, Rejection> {
    let caller = who.caller();
    let actor =
        |group: GroupId, cmd: GroupCommand| Route::Actor { key: EntityKey::Group(group), request: Request::Group(cmd) };
    let ticket_actor = |ticket: TicketId, cmd: TicketCommand| Route::Actor {
        key: EntityKey::Ticket(ticket),
        request: Request::Ticket(cmd),
    };
    let query = |group: GroupId, query: Query| Route::Query { key: EntityKey::Group(group), query };
    Ok(match op {
        "group.open" => {
            let a: OpenArgs = args(op, fields)?;
            if a.members.len() as u32 > cfg.group.max_members {
                return Err(Rejection::bad_request(format!(
                    "group.open: {} members listed, a group holds at most {}",
                    a.members.len(),
                    cfg.group.max_members
                ))
                .at_limit(Limit::MaxMembersPerGroup));
            }
            let open = OpenGroup {
                opener: caller,
                kind: a.kind,
                title: a.title,
                order_id: a.order_id,
                exception_type: a.exception_type,
                members: a.members,
                limits: cfg.group,
            };
            group::check_open(&open).map_err(|r| Rejection { message: format!("group.open: {}", r.message), ..r })?;
            let group = match a.group {
                Some(g) => g,
                None => GroupId::parse(&fresh_id("g")).expect("generated ids use the id grammar"),
            };
            actor(group, GroupCommand::Open(open))
        }
        "group.invite" => {
            let a: InviteArgs = args(op, fields)?;
            actor(a.group, GroupCommand::Invite { by: caller, user: a.user, role: a.role })
        }
        "group.remove" => {
            let a: UserArgs = args(op, fields)?;
            actor(a.group, GroupCommand::Remove { by: caller, user: a.user })
        }
        "group.leave" => {
            let a: GroupArg = args(op, fields)?;
            actor(a.group, GroupCommand::Leave { user: caller.user })
        }
        "group.close" => {
            let a: CloseArgs = args(op, fields)?;
            if a.resolution.chars().count() > MAX_RESOLUTION_CHARS {
                return Err(Rejection::bad_request(format!(
                    "group.close: resolution is longer than {MAX_RESOLUTION_CHARS} characters"
                )));
            }
            actor(a.group, GroupCommand::Close { by: caller, resolution: a.resolution })
        }
        "group.info" => {
            let a: GroupArg = args(op, fields)?;
            query(a.group, Query::GroupInfo { caller })
        }
        "msg.send" => {
            let a: SendArgs = args(op, fields)?;
            let body = a
                .body
                .validate(&cfg.body)
                .map_err(|r| Rejection { message: format!("msg.send: {}", r.message), ..r })?;
            actor(
                a.group,
                GroupCommand::Send(SendMessage {
                    from: caller,
                    client_msg_id: a.client_msg_id,
                    body,
                    require_receipt: a.require_receipt,
                    receipt_timeout_ms: cfg.receipt_timeout_ms,
                }),
            )
        }
        "msg.sync" => {
            let a: SyncArgs = args(op, fields)?;
            let limit = a.limit.unwrap_or(cfg.sync_limit_max);
            if limit == 0 || limit > cfg.sync_limit_max {
                return Err(Rejection::bad_request(format!(
                    "msg.sync: limit must be within 1..{}",
                    cfg.sync_limit_max
                ))
                .at_limit(Limit::SyncLimitMax));
            }
            query(a.group, Query::GroupSync { caller, after: a.after, limit })
        }
        "msg.read" => {
            let a: SeqArgs = args(op, fields)?;
            actor(a.group, GroupCommand::MarkRead { user: caller.user, seq: a.seq })
        }
        "msg.receipts" => {
            let a: SeqArgs = args(op, fields)?;
            query(a.group, Query::GroupReceipts { caller, seq: a.seq })
        }
        "inbox.sync" => Route::Actor { key: EntityKey::User(caller.user.clone()), request: Request::Inbox { caller } },
        "ticket.open" => {
            let a: TicketOpenArgs = args(op, fields)?;
            text_arg(op, "subject", &a.subject, ticket::MAX_SUBJECT_CHARS, false)?;
            text_arg(op, "description", &a.description, ticket::MAX_TEXT_CHARS, true)?;
            if let Some(order) = &a.order_id {
                text_arg(op, "order_id", order, crate::ids::MAX_ID_LEN, false)?;
            }
            let t = &cfg.tickets;
            let classes = ticket::classify(&t.rules, &a.subject, &a.description, who.tier);
            let ids = ticket_ids(a.ticket, classes.len(), &mut fresh_id)?;
            let tickets: Vec<(TicketId, OpenTicket)> = ids
                .into_iter()
                .zip(classes)
                .map(|(id, class)| {
                    let open = OpenTicket {
                        customer: who.user.clone(),
                        tier: who.tier,
                        subject: a.subject.clone(),
                        description: a.description.clone(),
                        order_id: a.order_id.clone(),
                        group: a.group.clone(),
                        class,
                        review_of: None,
                        settings: t.settings,
                    };
                    (id, open)
                })
                .collect();
            let first = tickets[0].0.clone();
            Route::Actor { key: EntityKey::Ticket(first), request: Request::OpenTickets { who: who.clone(), tickets } }
        }
        "ticket.get" => {
            let a: TicketGetArgs = args(op, fields)?;
            let most = cfg.tickets.settings.max_history + 64;
            let history_limit = a.history_limit.unwrap_or(most);
            if history_limit == 0 || history_limit > most {
                return Err(Rejection::bad_request(format!("ticket.get: history_limit must be within 1..{most}")));
            }
            Route::Query {
                key: EntityKey::Ticket(a.ticket),
                query: Query::TicketGet { who: who.clone(), history_limit },
            }
        }
        "ticket.list" => {
            let a: TicketListArgs = args(op, fields)?;
            let filter = TicketFilter { state: a.state, skill_group: a.skill_group, assignee: a.assignee };
            Route::Actor {
                key: EntityKey::User(who.user.clone()),
                request: Request::ListTickets { who: who.clone(), filter },
            }
        }
        "ticket.claim" => {
            let a: TicketArg = args(op, fields)?;
            ticket_actor(a.ticket, TicketCommand::Claim { by: who.clone() })
        }
        "ticket.reply" => {
            let a: TicketTextArgs = args(op, fields)?;
            text_arg(op, "text", &a.text, cfg.body.max_text_chars, false)?;
            ticket_actor(a.ticket, TicketCommand::Reply { by: who.clone(), text: a.text })
        }
        "ticket.propose" => {
            let a: TicketProposeArgs = args(op, fields)?;
            text_arg(op, "solution", &a.solution, ticket::MAX_TEXT_CHARS, false)?;
            ticket_actor(a.ticket, TicketCommand::Propose { by: who.clone(), solution: a.solution })
        }
        "ticket.confirm" => {
            let a: TicketConfirmArgs = args(op, fields)?;
            ticket_actor(a.ticket, TicketCommand::Confirm { by: who.clone(), accepted: a.accepted })
        }
        "ticket.escalate" => {
            let a: TicketEscalateArgs = args(op, fields)?;
            text_arg(op, "reason", &a.reason, ticket::MAX_REASON_CHARS, false)?;
            ticket_actor(a.ticket, TicketCommand::Escalate { by: who.clone(), reason: a.reason })
        }
        "ticket.rate" => {
            let a: TicketRateArgs = args(op, fields)?;
            if !(1..=5).contains(&a.score) {
                return Err(Rejection::bad_request(format!("ticket.rate: score must be 1 to 5, got {}", a.score)));
            }
            text_arg(op, "comment", &a.comment, ticket::MAX_REASON_CHARS, true)?;
            ticket_actor(a.ticket, TicketCommand::Rate { by: who.clone(), score: a.score, comment: a.comment })
        }
        "ticket.close" => {
            let a: TicketArg = args(op, fields)?;
            ticket_actor(a.ticket, TicketCommand::Close { by: who.clone() })
        }
        other => {
            return Err(Rejection::bad_request(format!(
                "unknown op {other:?}; known ops: hello, ping, {}",
                OPS.join(", ")
            )));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorCode;

    fn who() -> Principal {
        Principal::from_claims("u-1", &["driver".into()], &[], None).unwrap()
    }

    fn parse_json(op: &str, json: &str) -> Result<Route, Rejection> {
        let fields: Map<String, Value> = serde_json::from_str(json).unwrap();
        parse(op, &fields, &who(), &DomainConfig::default(), |p| format!("{p}-fresh"))
    }

    #[test]
    fn the_protocol_examples_parse() {
        let open = parse_json(
            "group.open",
            r#"{"id":"2","op":"group.open","group":"exc-20261122-0042","kind":"exception","title":"Parcel damaged at Wuhan hub","order_id":"ord-88231","exception_type":"damage","members":[{"user":"u-17","role":"driver"},{"user":"st-wh","role":"station"},{"user":"c-903","role":"customer"}]}"#,
        )
        .unwrap();
        assert_eq!(open.key(), &EntityKey::Group(GroupId::parse("exc-20261122-0042").unwrap()));
        let send = parse_json(
            "msg.send",
            r#"{"group":"exc-1","client_msg_id":"a1b2c3","body":{"type":"text","text":"外包装破损，已拍照"},"require_receipt":true}"#,
        )
        .unwrap();
        assert!(
            matches!(send, Route::Actor { request: Request::Group(GroupCommand::Send(ref s)), .. } if s.require_receipt)
        );
        assert!(matches!(
            parse_json("msg.sync", r#"{"group":"g","after":50,"limit":200}"#).unwrap(),
            Route::Query { .. }
        ));
        assert!(matches!(parse_json("inbox.sync", "{}").unwrap(), Route::Actor { request: Request::Inbox { .. }, .. }));
    }

    #[test]
    fn a_missing_group_id_is_assigned() {
        let open = parse_json("group.open", r#"{"kind":"chat"}"#).unwrap();
        assert_eq!(open.key(), &EntityKey::Group(GroupId::parse("g-fresh").unwrap()));
    }

    #[test]
    fn malformed_arguments_are_bad_requests_that_say_what_is_wrong() {
        for (op, json, says) in [
            ("msg.send", r#"{"group":"g"}"#, "missing field `client_msg_id`"),
            ("msg.send", r#"{"group":"g","client_msg_id":"x","body":{"type":"sticker"}}"#, "unknown variant `sticker`"),
            (
                "msg.send",
                r#"{"group":"g","client_msg_id":"x","body":{"type":"text","text":""}}"#,
                "body.text must not be empty",
            ),
            (
                "msg.send",
                r#"{"group":"bad id","client_msg_id":"x","body":{"type":"text","text":"a"}}"#,
                "group id may only contain",
            ),
            ("msg.sync", r#"{"group":"g","limit":501}"#, "limit must be within 1..500"),
            ("msg.sync", r#"{"group":"g","after":"ten"}"#, "invalid type"),
            ("group.open", r#"{"kind":"party"}"#, "unknown variant `party`"),
            ("group.open", r#"{"kind":"chat","exception_type":"damage"}"#, "only for groups of kind exception"),
            ("group.invite", r#"{"group":"g","user":"u2","role":"boss"}"#, "unknown variant `boss`"),
            ("msg.fly", "{}", "unknown op \"msg.fly\""),
        ] {
            let err = parse_json(op, json).unwrap_err();
            assert_eq!(err.code, ErrorCode::BadRequest, "{op} {json}");
            assert!(err.message.contains(says), "{op} {json}: {}", err.message);
        }
    }
}

#[cfg(test)]
mod limit_tests {
    use super::*;
    use crate::error::Limit;

    #[test]
    fn refusals_name_the_limit_behind_them() {
        let who = Principal::from_claims("u-1", &["driver".into()], &[], None).unwrap();
        let cfg = DomainConfig { body: crate::body::BodyLimits { max_text_chars: 3 }, ..DomainConfig::default() };
        let parse_json = |op: &str, json: &str| {
            let fields: Map<String, Value> = serde_json::from_str(json).unwrap();
            parse(op, &fields, &who, &cfg, |p| p.to_string())
        };
        let long = parse_json("msg.send", r#"{"group":"g","client_msg_id":"c","body":{"type":"text","text":"four"}}"#);
        assert_eq!(long.unwrap_err().limit, Some(Limit::MaxTextChars));
        let empty = parse_json("msg.send", r#"{"group":"g","client_msg_id":"c","body":{"type":"text","text":""}}"#);
        assert_eq!(empty.unwrap_err().limit, None);
        let sync = parse_json("msg.sync", r#"{"group":"g","limit":501}"#);
        assert_eq!(sync.unwrap_err().limit, Some(Limit::SyncLimitMax));
    }
}
