use super::*;
use crate::ErrorCode;

fn p(user: &str, role: &str, skills: &[&str]) -> Principal {
    let skills: Vec<String> = skills.iter().map(|s| s.to_string()).collect();
    Principal::from_claims(user, &[role.into()], &skills, None).unwrap()
}

fn id() -> TicketId {
    TicketId::parse("t-1").unwrap()
}

fn settings() -> TicketSettings {
    let sla = Sla { first_response_ms: 1000, resolution_ms: 5000 };
    TicketSettings { sla: SlaTable { low: sla, normal: sla, high: sla, urgent: sla }, max_history: 20 }
}

fn open() -> TicketCommand {
    TicketCommand::Open(OpenTicket {
        customer: UserId::parse("c-1").unwrap(),
        tier: Tier::Standard,
        subject: "运费多收费".into(),
        description: String::new(),
        order_id: None,
        group: Some(GroupId::parse("exc-1").unwrap()),
        class: Classified {
            category: "fee_dispute".into(),
            skill_group: SkillGroup::parse("fee").unwrap(),
            priority: Priority::Normal,
        },
        review_of: None,
        settings: settings(),
    })
}

struct T {
    state: Option<TicketState>,
    now: u64,
}

impl T {
    fn opened() -> T {
        let mut t = T { state: None, now: 100 };
        assert!(t.run(open()).reply.is_ok());
        t
    }
    fn run(&mut self, cmd: TicketCommand) -> TicketApplied {
        self.now += 1;
        TicketState::apply(&mut self.state, &id(), cmd, Timestamp(self.now))
    }
    fn s(&self) -> &TicketState {
        self.state.as_ref().unwrap()
    }
    fn code(&mut self, cmd: TicketCommand) -> ErrorCode {
        self.run(cmd).reply.unwrap_err().code
    }
}

#[test]
fn the_whole_lifecycle_moves_through_the_protocol_states() {
    let mut t = T::opened();
    let (agent, other, customer) =
        (p("a-1", "agent", &["fee"]), p("a-2", "agent", &["fee"]), p("c-1", "customer", &[]));
    assert_eq!(t.s().status, TicketStatus::Queued);
    assert_eq!(t.s().rev, 1);
    // The queue's offer at the revision it saw.
    let out = t.run(TicketCommand::Assign { agent: agent.user.clone(), rev: 1 });
    assert!(out.reply.is_ok());
    assert_eq!(out.event.as_ref().unwrap().notice, "assigned to the fee team, expected within 1 minute");
    assert_eq!(t.s().assignee, Some(agent.user.clone()));
    t.run(TicketCommand::Propose { by: agent.clone(), solution: "refund 10".into() }).reply.unwrap();
    assert_eq!(t.s().status, TicketStatus::AwaitingConfirmation);
    assert!(t.s().first_response_due.is_none(), "a proposal is a first response");
    t.run(TicketCommand::Confirm { by: customer.clone(), accepted: false }).reply.unwrap();
    assert_eq!((t.s().status, t.s().priority, t.s().assignee.clone()), (TicketStatus::Escalated, Priority::High, None));
    assert_eq!(t.s().summary(&id()).previous_assignee, Some(agent.user.clone()));
    t.run(TicketCommand::Claim { by: other.clone() }).reply.unwrap();
    t.run(TicketCommand::Propose { by: other.clone(), solution: "refund 20".into() }).reply.unwrap();
    t.run(TicketCommand::Confirm { by: customer.clone(), accepted: true }).reply.unwrap();
    assert_eq!(t.s().status, TicketStatus::Resolved);
    t.run(TicketCommand::Rate { by: customer.clone(), score: 2, comment: "slow".into() }).reply.unwrap();
    assert_eq!(t.s().review_ticket, Some(TicketId::parse("review-t-1").unwrap()));
    t.run(TicketCommand::Close { by: other }).reply.unwrap();
    assert_eq!(t.s().status, TicketStatus::Closed);
    // One history entry per step, numbered without gaps.
    assert_eq!(t.s().last_seq, 11);
}

#[test]
fn illegal_transitions_and_strangers_are_refused_with_the_state_named() {
    let mut t = T::opened();
    let (agent, customer) = (p("a-1", "agent", &["fee"]), p("c-1", "customer", &[]));
    let err = t.run(TicketCommand::Confirm { by: customer.clone(), accepted: true }).reply.unwrap_err();
    assert_eq!(err.code, ErrorCode::Conflict);
    assert!(err.message.contains("queued"), "{}", err.message);
    assert_eq!(t.code(TicketCommand::Propose { by: agent.clone(), solution: "x".into() }), ErrorCode::Conflict);
    assert_eq!(t.code(TicketCommand::Claim { by: customer.clone() }), ErrorCode::Forbidden);
    assert_eq!(t.code(TicketCommand::Claim { by: p("a-9", "agent", &["damage"]) }), ErrorCode::Forbidden);
    assert_eq!(t.code(TicketCommand::Reply { by: p("c-2", "customer", &[]), text: "hi".into() }), ErrorCode::Forbidden);
    assert_eq!(t.code(TicketCommand::Assign { agent: agent.user.clone(), rev: 7 }), ErrorCode::Conflict);
    t.run(TicketCommand::Claim { by: agent.clone() }).reply.unwrap();
    assert_eq!(
        t.code(TicketCommand::Propose { by: p("a-2", "agent", &["fee"]), solution: "x".into() }),
        ErrorCode::Forbidden
    );
    assert_eq!(t.code(TicketCommand::Propose { by: customer, solution: "x".into() }), ErrorCode::Forbidden);
    assert!(authorize_read(t.state.as_ref(), &p("c-2", "customer", &[])).is_err());
    assert!(authorize_read(None, &p("c-2", "customer", &[])).unwrap_err().code == ErrorCode::Forbidden);
}

#[test]
fn a_deadline_fires_once_and_never_early() {
    let mut t = T::opened();
    let due = t.s().first_response_due.unwrap();
    let early = t.run(TicketCommand::Fire(TicketTimer::FirstResponse));
    assert!(!early.state_changed && t.s().breaches == 0);
    t.now = due.0;
    let fired = t.run(TicketCommand::Fire(TicketTimer::FirstResponse));
    assert!(fired.state_changed);
    assert_eq!((t.s().breaches, t.s().status, t.s().priority), (1, TicketStatus::Escalated, Priority::High));
    assert!(fired.timers.contains(&(TicketTimer::FirstResponse, None)));
    let again = t.run(TicketCommand::Fire(TicketTimer::FirstResponse));
    assert!(!again.state_changed);
    assert_eq!(t.s().breaches, 1);
}

/// Every pending delivery of both lanes: requests, then webhooks.
fn everything_due(outbox: &Outbox) -> Vec<crate::outbox::Pending> {
    Lane::ALL.iter().flat_map(|lane| outbox.due(Timestamp(u64::MAX), *lane)).collect()
}

#[test]
fn every_change_tells_the_queue_the_group_and_the_webhook_through_the_outbox() {
    let mut t = T::opened();
    let kinds = |t: &T| {
        everything_due(&t.s().outbox)
            .iter()
            .map(|p| match &p.delivery {
                Delivery::Webhook(h) => h.event.clone(),
                Delivery::Request { key, .. } => key.kind().as_str().to_string(),
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(kinds(&t), ["group", "skill_queue", "ticket.changed"]);
    let ids: Vec<(u64, DeliveryResult)> =
        everything_due(&t.s().outbox).iter().map(|p| (p.id, DeliveryResult::Delivered)).collect();
    let settled = t.run(TicketCommand::Settle { results: ids, max_attempts: 3 });
    for lane in Lane::ALL {
        assert!(settled.timers.contains(&(TicketTimer::Outbox(lane), None)));
    }
    assert!(t.s().outbox.is_empty());
    t.run(TicketCommand::Claim { by: p("a-1", "agent", &["fee"]) }).reply.unwrap();
    assert_eq!(kinds(&t), ["skill_queue", "group", "ticket.changed"]);
}

#[test]
fn a_ticket_with_the_longest_id_still_notes_its_group_once_per_change() {
    let long = TicketId::parse(&"t".repeat(crate::ids::MAX_ID_LEN)).unwrap();
    let mut state = None;
    let mut run = |cmd, at| TicketState::apply(&mut state, &long, cmd, Timestamp(at)).reply.unwrap();
    run(open(), 1);
    run(TicketCommand::Claim { by: p("a-1", "agent", &["fee"]) }, 2);
    run(TicketCommand::Propose { by: p("a-1", "agent", &["fee"]), solution: "refund".into() }, 3);
    let notes: Vec<ClientMsgId> = everything_due(&state.as_ref().unwrap().outbox)
        .into_iter()
        .filter_map(|p| match p.delivery {
            Delivery::Request { request: Request::Group(GroupCommand::Note { note_id, .. }), .. } => note_id,
            _ => None,
        })
        .collect();
    assert_eq!(notes.len(), 3, "linked, assigned, awaiting confirmation: {notes:?}");
    let distinct: std::collections::BTreeSet<&str> = notes.iter().map(|n| n.as_str()).collect();
    assert_eq!(distinct.len(), 3, "{notes:?}");
}
