use std::cell::RefCell;
use std::collections::HashMap;

use proptest::prelude::*;

use super::*;
use crate::body::Body;
use crate::error::ErrorCode;

/// The stored log, in memory: what the runtime keeps in its storage engine.
#[derive(Default)]
struct MemLog {
    entries: RefCell<Vec<Entry>>,
    dedupe: RefCell<HashMap<(UserId, ClientMsgId), (Seq, Timestamp)>>,
}

impl GroupLog for MemLog {
    fn group_id(&self) -> &GroupId {
        static ID: std::sync::OnceLock<GroupId> = std::sync::OnceLock::new();
        ID.get_or_init(|| GroupId::parse("g-test").unwrap())
    }
    fn find_client_msg(&self, sender: &UserId, id: &ClientMsgId) -> Result<Option<(Seq, Timestamp)>, StorageFault> {
        Ok(self.dedupe.borrow().get(&(sender.clone(), id.clone())).copied())
    }
}

struct Harness {
    state: Option<GroupState>,
    log: MemLog,
    now: u64,
}

const LIMITS: GroupLimits = GroupLimits { max_members: 5, max_receipt_watches: 3 };

fn u(s: &str) -> UserId {
    UserId::parse(s).unwrap()
}
fn caller(s: &str) -> Caller {
    Caller { user: u(s), admin: false }
}
fn text(t: &str) -> MessageBody {
    Body::Text { text: t.into() }.validate(&crate::body::BodyLimits { max_text_chars: 100 }).unwrap()
}

impl Harness {
    fn new() -> Self {
        Harness { state: None, log: MemLog::default(), now: 1_000 }
    }

    fn opened(members: &[(&str, MemberRole)]) -> Self {
        let mut h = Self::new();
        let reply = h.run(open_cmd("owner", members)).reply.unwrap();
        assert_eq!(reply, GroupReply::Opened { created: true });
        h
    }

    fn run(&mut self, cmd: GroupCommand) -> GroupApplied {
        self.now += 10;
        let out = GroupState::apply(&mut self.state, cmd, Timestamp(self.now), &self.log).unwrap();
        for e in &out.effects {
            if let GroupEffect::Append(entry) = e {
                let mut entries = self.log.entries.borrow_mut();
                assert_eq!(entry.seq, entries.len() as u64 + 1, "seqs must be contiguous");
                if let Some(id) = &entry.client_msg_id {
                    self.log.dedupe.borrow_mut().insert((entry.from.clone(), id.clone()), (entry.seq, entry.ts));
                }
                entries.push(entry.clone());
            }
        }
        out
    }

    fn send(&mut self, from: &str, id: &str) -> Result<GroupReply, Rejection> {
        self.run(send_cmd(from, id, false)).reply
    }

    fn state(&self) -> &GroupState {
        self.state.as_ref().unwrap()
    }
}

fn open_cmd(opener: &str, members: &[(&str, MemberRole)]) -> GroupCommand {
    GroupCommand::Open(OpenGroup {
        opener: caller(opener),
        kind: GroupKind::Exception,
        title: "Parcel damaged".into(),
        order_id: Some("ord-1".into()),
        exception_type: Some(ExceptionType::Damage),
        members: members.iter().map(|(user, role)| MemberSpec { user: u(user), role: *role }).collect(),
        limits: LIMITS,
    })
}

fn send_cmd(from: &str, id: &str, require_receipt: bool) -> GroupCommand {
    GroupCommand::Send(SendMessage {
        from: caller(from),
        client_msg_id: ClientMsgId::parse(id).unwrap(),
        body: text("hello"),
        require_receipt,
        receipt_timeout_ms: 100,
    })
}

#[test]
fn open_writes_a_system_entry_and_makes_the_opener_owner() {
    let h = Harness::opened(&[("driver", MemberRole::Driver), ("customer", MemberRole::Customer)]);
    let s = h.state();
    assert_eq!(s.last_seq, 1);
    assert_eq!(s.members[&u("owner")].role, MemberRole::Owner);
    assert_eq!(s.members.len(), 3);
    let first = &h.log.entries.borrow()[0];
    assert!(first.body.json.contains(r#""event":"group_opened""#), "{}", first.body.json);
}

#[test]
fn reopen_by_the_same_opener_is_idempotent_and_anyone_else_conflicts() {
    let mut h = Harness::opened(&[]);
    assert_eq!(h.run(open_cmd("owner", &[])).reply, Ok(GroupReply::Opened { created: false }));
    assert_eq!(h.run(open_cmd("someone", &[])).reply.unwrap_err().code, ErrorCode::Conflict);
    assert_eq!(h.state().last_seq, 1);
}

#[test]
fn outsiders_are_forbidden_whether_or_not_the_group_exists() {
    let mut missing = Harness::new();
    let mut existing = Harness::opened(&[]);
    for h in [&mut missing, &mut existing] {
        let err = h.send("stranger", "m1").unwrap_err();
        assert_eq!(err.code, ErrorCode::Forbidden);
        assert_eq!(err.message, "not a member of this group");
        assert!(authorize_read(h.state.as_ref(), &caller("stranger")).is_err());
    }
    assert!(authorize_read(existing.state.as_ref(), &Caller { user: u("root"), admin: true }).is_ok());
}

#[test]
fn retried_sends_return_the_original_seq() {
    let mut h = Harness::opened(&[("driver", MemberRole::Driver)]);
    let first = h.send("driver", "a1").unwrap();
    let GroupReply::Sent { seq, ts, duplicate: false } = first else { panic!("{first:?}") };
    h.send("owner", "b1").unwrap();
    assert_eq!(h.send("driver", "a1").unwrap(), GroupReply::Sent { seq, ts, duplicate: true });
    // The same client_msg_id from another sender is another message.
    assert!(matches!(h.send("owner", "a1").unwrap(), GroupReply::Sent { duplicate: false, .. }));
    assert_eq!(h.state().last_seq, 4);
}

#[test]
fn only_managers_change_membership_and_closed_groups_refuse_messages() {
    let mut h = Harness::opened(&[("driver", MemberRole::Driver), ("agent", MemberRole::Agent)]);
    let invite =
        |by: &str, user: &str| GroupCommand::Invite { by: caller(by), user: u(user), role: MemberRole::Station };
    assert_eq!(h.run(invite("driver", "st")).reply.unwrap_err().code, ErrorCode::Forbidden);
    assert_eq!(h.run(invite("agent", "st")).reply, Ok(GroupReply::Updated { changed: true }));
    assert_eq!(h.run(invite("agent", "st")).reply, Ok(GroupReply::Updated { changed: false }));
    let remove_owner = GroupCommand::Remove { by: caller("agent"), user: u("owner") };
    assert_eq!(h.run(remove_owner).reply.unwrap_err().code, ErrorCode::Conflict);
    let close = GroupCommand::Close { by: caller("agent"), resolution: "refunded".into() };
    assert_eq!(h.run(close.clone()).reply, Ok(GroupReply::Updated { changed: true }));
    assert_eq!(h.run(close).reply, Ok(GroupReply::Updated { changed: false }));
    assert_eq!(h.send("driver", "late").unwrap_err().code, ErrorCode::Conflict);
    assert_eq!(h.state().info().state, GroupStatus::Closed);
    assert_eq!(h.run(invite("agent", "st2")).reply.unwrap_err().code, ErrorCode::Conflict);
    // Members may still leave a closed group (it frees a place in their group limit).
    let leave = h.run(GroupCommand::Leave { user: u("driver") });
    assert_eq!(leave.reply, Ok(GroupReply::Updated { changed: true }));
    assert!(!h.state().members.contains_key(&u("driver")));
}

#[test]
fn a_sent_message_keeps_its_seq_for_retries_after_the_group_closed_or_the_sender_left() {
    let mut h = Harness::opened(&[("driver", MemberRole::Driver), ("agent", MemberRole::Agent)]);
    let Ok(GroupReply::Sent { seq: by_driver, ts: driver_ts, .. }) = h.send("driver", "d1") else { panic!() };
    let Ok(GroupReply::Sent { seq: by_agent, ts: agent_ts, .. }) = h.send("agent", "a1") else { panic!() };
    h.run(GroupCommand::Remove { by: caller("owner"), user: u("driver") }).reply.unwrap();
    let last = h.state().last_seq;
    assert_eq!(h.send("driver", "d1"), Ok(GroupReply::Sent { seq: by_driver, ts: driver_ts, duplicate: true }));
    assert_eq!(h.send("driver", "d2").unwrap_err().code, ErrorCode::Forbidden);
    h.run(GroupCommand::Close { by: caller("agent"), resolution: "done".into() }).reply.unwrap();
    assert_eq!(h.send("agent", "a1"), Ok(GroupReply::Sent { seq: by_agent, ts: agent_ts, duplicate: true }));
    assert_eq!(h.send("agent", "a2").unwrap_err().code, ErrorCode::Conflict);
    assert_eq!(h.state().last_seq, last + 1, "only the closing entry was appended");
}

#[test]
fn groups_are_bounded() {
    let mut h = Harness::opened(&[
        ("a", MemberRole::Agent),
        ("b", MemberRole::Driver),
        ("c", MemberRole::Driver),
        ("d", MemberRole::Driver),
    ]);
    let full = h.run(GroupCommand::Invite { by: caller("a"), user: u("e"), role: MemberRole::Observer });
    assert_eq!(full.reply.unwrap_err().code, ErrorCode::Conflict);
    let too_many = open_cmd(
        "x",
        &[
            ("a", MemberRole::Driver),
            ("b", MemberRole::Driver),
            ("c", MemberRole::Driver),
            ("d", MemberRole::Driver),
            ("e", MemberRole::Driver),
        ],
    );
    assert_eq!(Harness::new().run(too_many).reply.unwrap_err().code, ErrorCode::BadRequest);
}

#[test]
fn removed_members_see_their_removal_and_lose_access() {
    let mut h = Harness::opened(&[("driver", MemberRole::Driver)]);
    let out = h.run(GroupCommand::Remove { by: caller("owner"), user: u("driver") });
    assert!(out.effects.contains(&GroupEffect::MemberGone { user: u("driver") }));
    assert!(authorize_read(h.state.as_ref(), &caller("driver")).is_err());
    assert_eq!(h.send("driver", "x").unwrap_err().code, ErrorCode::Forbidden);
}

#[test]
fn read_positions_only_move_forward() {
    let mut h = Harness::opened(&[("driver", MemberRole::Driver)]);
    h.send("owner", "m1").unwrap();
    h.send("owner", "m2").unwrap();
    let read = |seq| GroupCommand::MarkRead { user: u("driver"), seq };
    assert_eq!(h.run(read(3)).reply, Ok(GroupReply::Read { read_seq: 3 }));
    let back = h.run(read(2));
    assert_eq!(back.reply, Ok(GroupReply::Read { read_seq: 3 }));
    assert!(back.effects.is_empty());
    assert_eq!(h.run(read(9)).reply.unwrap_err().code, ErrorCode::BadRequest);
    assert_eq!(h.state().members[&u("driver")].read_seq, 3);
}

#[test]
fn receipt_watch_fires_once_and_only_when_due() {
    let mut h = Harness::opened(&[("driver", MemberRole::Driver), ("customer", MemberRole::Customer)]);
    let out = h.run(send_cmd("owner", "r1", true));
    let GroupReply::Sent { seq, .. } = out.reply.unwrap() else { panic!() };
    let timer = GroupTimer::ReceiptOverdue { seq };
    assert!(out.effects.iter().any(|e| matches!(e, GroupEffect::TimerSet { timer: t, .. } if *t == timer)));
    // Too early: nothing happens.
    let early = h.run(GroupCommand::Fire(timer));
    assert!(early.effects.is_empty());
    h.run(GroupCommand::MarkRead { user: u("driver"), seq });
    h.now += 1_000;
    let fired = h.run(GroupCommand::Fire(timer));
    assert!(
        fired.effects.contains(&GroupEffect::ReceiptOverdue { seq, pending: vec![u("customer")] }),
        "{:?}",
        fired.effects
    );
    let last = h.log.entries.borrow().last().unwrap().clone();
    assert_eq!(last.from.as_str(), crate::ids::SYSTEM_USER);
    assert!(last.body.json.contains(r#""event":"receipt_overdue""#));
    // Fired again (e.g. by a new leader): nothing more.
    let again = h.run(GroupCommand::Fire(timer));
    assert!(!again.state_changed && again.effects.is_empty());
}

#[test]
fn receipt_watch_outlives_closing_the_group() {
    let mut h = Harness::opened(&[("driver", MemberRole::Driver)]);
    let GroupReply::Sent { seq, .. } = h.run(send_cmd("owner", "r1", true)).reply.unwrap() else { panic!() };
    let closed = h.run(GroupCommand::Close { by: caller("owner"), resolution: "done".into() });
    assert!(!closed.effects.iter().any(|e| matches!(e, GroupEffect::TimerCleared { .. })), "{:?}", closed.effects);
    h.now += 1_000;
    let fired = h.run(GroupCommand::Fire(GroupTimer::ReceiptOverdue { seq }));
    assert!(fired.effects.contains(&GroupEffect::ReceiptOverdue { seq, pending: vec![u("driver")] }));
    assert!(h.log.entries.borrow().last().unwrap().body.json.contains(r#""event":"receipt_overdue""#));
}

#[test]
fn receipt_watch_is_cleared_when_everyone_read() {
    let mut h = Harness::opened(&[("driver", MemberRole::Driver)]);
    let GroupReply::Sent { seq, .. } = h.run(send_cmd("owner", "r1", true)).reply.unwrap() else { panic!() };
    let out = h.run(GroupCommand::MarkRead { user: u("driver"), seq });
    assert!(out.effects.contains(&GroupEffect::TimerCleared { timer: GroupTimer::ReceiptOverdue { seq } }));
    assert!(h.state().receipt_watches.is_empty());
    assert_eq!(h.state().receipts(seq, Some(&u("owner"))).pending, Vec::<UserId>::new());
}

#[derive(Debug, Clone)]
enum Op {
    Send { who: usize, id: u8 },
    Read { who: usize, seq: u64 },
    Invite { who: usize },
    Remove { who: usize },
}

const PEOPLE: [&str; 4] = ["owner", "driver", "customer", "station"];

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..4usize, 0..8u8).prop_map(|(who, id)| Op::Send { who, id }),
        2 => (0..4usize, 0..40u64).prop_map(|(who, seq)| Op::Read { who, seq }),
        1 => (1..4usize).prop_map(|who| Op::Invite { who }),
        1 => (1..4usize).prop_map(|who| Op::Remove { who }),
    ]
}

proptest! {
    /// Whatever happens, the log is 1..=last_seq without gaps (checked in `run`), a
    /// (sender, client_msg_id) is stored once, and replaying the same commands on a second
    /// replica gives the same state and the same entries.
    #[test]
    fn any_history_keeps_the_log_contiguous_deduplicated_and_deterministic(ops in proptest::collection::vec(op(), 1..60)) {
        let mut replicas = [Harness::opened(&[("driver", MemberRole::Driver)]), Harness::opened(&[("driver", MemberRole::Driver)])];
        for op in ops {
            let cmd = match op {
                Op::Send { who, id } => send_cmd(PEOPLE[who], &format!("m{id}"), id % 3 == 0),
                Op::Read { who, seq } => GroupCommand::MarkRead { user: u(PEOPLE[who]), seq },
                Op::Invite { who } => GroupCommand::Invite { by: caller("owner"), user: u(PEOPLE[who]), role: MemberRole::Station },
                Op::Remove { who } => GroupCommand::Remove { by: caller("owner"), user: u(PEOPLE[who]) },
            };
            let a = replicas[0].run(cmd.clone());
            let b = replicas[1].run(cmd);
            prop_assert_eq!(a, b);
        }
        let [a, b] = &replicas;
        prop_assert_eq!(a.state.as_ref(), b.state.as_ref());
        prop_assert_eq!(&*a.log.entries.borrow(), &*b.log.entries.borrow());
        let entries = a.log.entries.borrow();
        let mut seen = std::collections::HashSet::new();
        for e in entries.iter() {
            if let Some(id) = &e.client_msg_id {
                prop_assert!(seen.insert((e.from.clone(), id.clone())), "stored twice: {:?}", e);
            }
        }
        prop_assert_eq!(a.state().last_seq, entries.len() as u64);
    }
}
