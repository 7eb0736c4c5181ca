//! The entities' behaviour against a runtime that lives in this process: every command is
//! applied at once, in order, to in-memory state.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::*;
use crate::ErrorCode;
use crate::domain::{self, LogIndex, LogReader, Outcome};
use crate::entity::StorageFault;
use crate::ops::{self, Route};
use crate::principal::Principal;

#[derive(Default)]
struct World {
    states: HashMap<EntityKey, EntityState>,
    logs: HashMap<EntityKey, Vec<Entry>>,
    idempotency: HashMap<(EntityKey, String), (u64, Timestamp)>,
    pushes: Vec<(Vec<UserId>, String)>,
    hooks: Vec<crate::outbox::Webhook>,
    clock: u64,
}

impl LogIndex for World {
    fn find_idempotent(&self, key: &EntityKey, k: &str) -> Result<Option<(u64, Timestamp)>, StorageFault> {
        Ok(self.idempotency.get(&(key.clone(), k.to_string())).copied())
    }
}

impl LogReader for World {
    fn read_entries(&self, key: &EntityKey, after: u64, limit: u32) -> Result<Vec<Entry>, StorageFault> {
        let log = self.logs.get(key).map(Vec::as_slice).unwrap_or(&[]);
        Ok(log.iter().filter(|e| e.seq > after).take(limit as usize).cloned().collect())
    }
}

#[derive(Clone, Default)]
struct LocalRuntime {
    world: Arc<Mutex<World>>,
    cfg: Arc<DomainConfig>,
}

impl LocalRuntime {
    fn apply(&self, key: &EntityKey, cmd: Command) -> Outcome {
        let mut w = self.world.lock().unwrap();
        w.clock += 1;
        let at = Timestamp(w.clock);
        let mut state = w.states.remove(key);
        let out = domain::apply(key, &mut state, cmd, at, &*w).unwrap();
        if let Some(s) = state {
            w.states.insert(key.clone(), s);
        }
        for e in &out.appended {
            if let Some(k) = e.idempotency_key() {
                w.idempotency.insert((key.clone(), k), (e.seq, e.ts));
            }
            w.logs.entry(key.clone()).or_default().push(e.clone());
        }
        out
    }

    fn state(&self, key: &EntityKey) -> Option<EntityState> {
        self.world.lock().unwrap().states.get(key).cloned()
    }

    async fn call(&self, who: &Principal, op: &str, json: &str) -> Result<Reply, Rejection> {
        let fields = serde_json::from_str(json).unwrap();
        let route = ops::parse(op, &fields, who, &self.cfg, |p| format!("{p}-auto"))?;
        match route {
            Route::Actor { key, request } => self.request(key, request).await,
            Route::Query { key, query } => self.query(key, query).await,
        }
    }
}

impl Runtime for LocalRuntime {
    fn now(&self) -> Timestamp {
        Timestamp(self.world.lock().unwrap().clock)
    }
    fn config(&self) -> &DomainConfig {
        &self.cfg
    }
    fn propose(&self, key: EntityKey, cmd: Command) -> ReplyFuture {
        let out = self.apply(&key, cmd);
        let state = self.state(&key);
        on_applied(&key, state.as_ref(), &out.appended, &out.notices, Pushes::Send, self);
        Box::pin(async move { out.reply })
    }
    fn request(&self, key: EntityKey, req: Request) -> ReplyFuture {
        let state = self.state(&key);
        match handle(&key, state.as_ref(), req, self) {
            Handling::Done(r) => Box::pin(async move { r }),
            Handling::Task(t) => t,
        }
    }
    fn query(&self, key: EntityKey, q: Query) -> ReplyFuture {
        let w = self.world.lock().unwrap();
        let r = domain::query(&key, w.states.get(&key), q, &*w).unwrap();
        Box::pin(async move { r })
    }
    fn push(&self, users: &[UserId], event: &Event) {
        self.world.lock().unwrap().pushes.push((users.to_vec(), event.to_frame()));
    }
    fn spawn(&self, task: ReplyFuture) {
        tokio::spawn(task);
    }
    fn webhook(&self, hook: &crate::outbox::Webhook) -> ReplyFuture {
        self.world.lock().unwrap().hooks.push(hook.clone());
        Box::pin(async { Ok(Reply::Fired) })
    }
}

fn person(user: &str, role: &str) -> Principal {
    Principal::from_claims(user, &[role.into()], &[], None).unwrap()
}

fn inbox_groups(reply: Reply) -> Vec<String> {
    let Reply::Inbox { groups } = reply else { panic!("{reply:?}") };
    groups.into_iter().map(|l| l.group.to_string()).collect()
}

const OPEN: &str = r#"{"group":"exc-1","kind":"exception","title":"Parcel damaged","exception_type":"damage",
    "members":[{"user":"driver","role":"driver"},{"user":"cust","role":"customer"}]}"#;

#[tokio::test]
async fn opening_a_group_lists_it_in_every_members_inbox_first() {
    let rt = LocalRuntime::default();
    let owner = person("disp", "dispatcher");
    let opened = rt.call(&owner, "group.open", OPEN).await.unwrap();
    assert_eq!(opened, Reply::Opened { group: GroupId::parse("exc-1").unwrap(), created: true });
    for user in ["disp", "driver", "cust"] {
        let inbox = rt.call(&person(user, "driver"), "inbox.sync", "{}").await.unwrap();
        assert_eq!(inbox_groups(inbox), vec!["exc-1"], "{user}");
    }
    assert_eq!(
        rt.call(&owner, "group.open", OPEN).await.unwrap(),
        Reply::Opened { group: GroupId::parse("exc-1").unwrap(), created: false }
    );
}

#[tokio::test]
async fn sends_are_pushed_to_members_and_synced_in_order() {
    let rt = LocalRuntime::default();
    let driver = person("driver", "driver");
    rt.call(&person("disp", "dispatcher"), "group.open", OPEN).await.unwrap();
    for i in 0..3 {
        let body = format!(r#"{{"group":"exc-1","client_msg_id":"m{i}","body":{{"type":"text","text":"t{i}"}}}}"#);
        let sent = rt.call(&driver, "msg.send", &body).await.unwrap();
        assert!(matches!(sent, Reply::Sent { seq, duplicate: false, .. } if seq == i + 2));
    }
    let synced = rt.call(&driver, "msg.sync", r#"{"group":"exc-1","after":1,"limit":2}"#).await.unwrap();
    let Reply::Messages { messages, last_seq } = synced else { panic!() };
    assert_eq!(last_seq, 4);
    assert_eq!(messages.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![2, 3]);
    let pushes = &rt.world.lock().unwrap().pushes;
    let msg_pushes: Vec<_> = pushes.iter().filter(|(_, f)| f.contains(r#""ev":"msg""#)).collect();
    assert_eq!(msg_pushes.len(), 4, "the open entry and three messages");
    assert!(msg_pushes.iter().all(|(to, _)| to.len() == 3));
}

#[tokio::test]
async fn a_full_inbox_refuses_the_group_and_nothing_is_opened() {
    let rt = LocalRuntime {
        cfg: Arc::new(DomainConfig { max_groups_per_user: 1, ..DomainConfig::default() }),
        ..Default::default()
    };
    let disp = person("disp", "dispatcher");
    rt.call(&disp, "group.open", r#"{"group":"a","kind":"chat","members":[{"user":"driver","role":"driver"}]}"#)
        .await
        .unwrap();
    let err = rt
        .call(&disp, "group.open", r#"{"group":"b","kind":"chat","members":[{"user":"x","role":"driver"}]}"#)
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::Conflict);
    assert!(err.message.starts_with("disp:"), "{}", err.message);
    assert!(rt.state(&EntityKey::Group(GroupId::parse("b").unwrap())).is_none());
}

#[tokio::test]
async fn removal_takes_the_group_out_of_the_inbox_and_the_removed_member_hears_it() {
    let rt = LocalRuntime::default();
    let disp = person("disp", "dispatcher");
    rt.call(&disp, "group.open", OPEN).await.unwrap();
    rt.call(&disp, "group.remove", r#"{"group":"exc-1","user":"driver"}"#).await.unwrap();
    let driver = person("driver", "driver");
    assert!(inbox_groups(rt.call(&driver, "inbox.sync", "{}").await.unwrap()).is_empty());
    let err = rt.call(&driver, "msg.sync", r#"{"group":"exc-1"}"#).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::Forbidden);
    let pushes = &rt.world.lock().unwrap().pushes;
    let (to, frame) = pushes.last().unwrap();
    assert!(frame.contains("member_removed") && to.contains(&UserId::parse("driver").unwrap()));
}

#[tokio::test]
async fn retrying_a_removal_forgets_a_listing_a_crash_left_behind() {
    let rt = LocalRuntime::default();
    let disp = person("disp", "dispatcher");
    rt.call(&disp, "group.open", OPEN).await.unwrap();
    // The removal commits, then the node dies before the inbox forgets the group.
    let group = EntityKey::Group(GroupId::parse("exc-1").unwrap());
    let by = crate::Caller { user: UserId::parse("disp").unwrap(), admin: false };
    let remove = GroupCommand::Remove { user: UserId::parse("driver").unwrap(), by };
    rt.apply(&group, Command::Group(remove));
    let driver_key = EntityKey::User(UserId::parse("driver").unwrap());
    let listed = |rt: &LocalRuntime| match rt.state(&driver_key) {
        Some(EntityState::User(u)) => u.groups.len(),
        _ => 0,
    };
    assert_eq!(listed(&rt), 1, "the stale listing counts against the user's group limit");
    // The client retries; the group changes nothing, the inbox still forgets.
    let retried = rt.call(&disp, "group.remove", r#"{"group":"exc-1","user":"driver"}"#).await.unwrap();
    assert_eq!(retried, Reply::Updated { changed: false });
    assert_eq!(listed(&rt), 0);
}

#[tokio::test]
async fn inbox_counts_unread_and_reads_are_shared() {
    let rt = LocalRuntime::default();
    let disp = person("disp", "dispatcher");
    rt.call(&disp, "group.open", OPEN).await.unwrap();
    rt.call(&disp, "msg.send", r#"{"group":"exc-1","client_msg_id":"m","body":{"type":"text","text":"hi"}}"#)
        .await
        .unwrap();
    let cust = person("cust", "customer");
    let Reply::Inbox { groups } = rt.call(&cust, "inbox.sync", "{}").await.unwrap() else { panic!() };
    assert_eq!((groups[0].item.last_seq, groups[0].item.read_seq, groups[0].item.unread), (2, 0, 2));
    rt.call(&cust, "msg.read", r#"{"group":"exc-1","seq":2}"#).await.unwrap();
    let Reply::Receipts(r) = rt.call(&disp, "msg.receipts", r#"{"group":"exc-1","seq":2}"#).await.unwrap() else {
        panic!()
    };
    assert!(r.read_by.contains(&UserId::parse("cust").unwrap()) && r.pending == vec![UserId::parse("driver").unwrap()]);
    let frames: Vec<String> = rt.world.lock().unwrap().pushes.iter().map(|p| p.1.clone()).collect();
    assert!(frames.iter().any(|f| f == r#"{"ev":"receipt","group":"exc-1","user":"cust","read_seq":2}"#));
}

#[tokio::test]
async fn another_users_inbox_is_forbidden() {
    let rt = LocalRuntime::default();
    let err = rt
        .query(
            EntityKey::User(UserId::parse("a").unwrap()),
            Query::InboxGroups { caller: person("b", "driver").caller() },
        )
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::Forbidden);
}

mod tickets {
    use super::*;
    use crate::domain::{Timer, fire};
    use crate::ticket::TicketTimer;
    use crate::ticket::{Category, Priority, Rules, TicketStatus};

    fn desk_runtime() -> LocalRuntime {
        let cat = |name: &str, skill: &str, words: &[&str]| Category {
            name: name.into(),
            skill_group: crate::ids::SkillGroup::parse(skill).unwrap(),
            priority: Priority::Normal,
            keywords: words.iter().map(|w| w.to_string()).collect(),
        };
        let mut cfg = DomainConfig::default();
        cfg.tickets.rules = Rules::new(
            vec![cat("fee_dispute", "fee", &["运费"]), cat("service_attitude", "quality", &["态度"])],
            cat("other", "general", &[]),
            vec![],
        );
        LocalRuntime { cfg: Arc::new(cfg), ..LocalRuntime::default() }
    }

    fn agent(user: &str, skill: &str) -> Principal {
        Principal::from_claims(user, &["agent".into()], &[skill.into()], None).unwrap()
    }

    /// What a node reports when `who` connects: their queues learn they are here.
    async fn connected(rt: &LocalRuntime, who: &Principal) {
        for (key, req) in presence(who, &rt.cfg) {
            rt.request(key, req).await.unwrap();
        }
    }

    /// What a node reports when `who`'s last connection goes.
    async fn gone(rt: &LocalRuntime, who: &Principal) {
        for (key, req) in absence(who) {
            rt.request(key, req).await.unwrap();
        }
    }

    /// Lets background tasks run and delivers every outbox until nothing is left.
    async fn settle(rt: &LocalRuntime) {
        for _ in 0..20 {
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            let lanes = crate::outbox::Lane::ALL;
            let due: Vec<(EntityKey, Timer)> = rt
                .world
                .lock()
                .unwrap()
                .states
                .iter()
                .flat_map(|(k, s)| {
                    let timers: Vec<Timer> = match s {
                        EntityState::Ticket(t) if !t.outbox.is_empty() => {
                            lanes.map(|l| Timer::Ticket(TicketTimer::Outbox(l))).to_vec()
                        }
                        EntityState::SkillQueue(q) if !q.outbox.is_empty() => {
                            lanes.map(|l| Timer::Queue(crate::queue::QueueTimer::Outbox(l))).to_vec()
                        }
                        EntityState::Group(g) if !g.outbox.is_empty() => {
                            lanes.map(|l| Timer::Group(crate::group::GroupTimer::Outbox(l))).to_vec()
                        }
                        _ => Vec::new(),
                    };
                    timers.into_iter().map(|t| (k.clone(), t))
                })
                .collect();
            if due.is_empty() {
                return;
            }
            for (key, timer) in due {
                rt.request(key, fire(timer)).await.unwrap();
            }
        }
        panic!("outboxes never emptied");
    }

    fn ticket(rt: &LocalRuntime, id: &str) -> crate::ticket::TicketState {
        match rt.state(&EntityKey::Ticket(TicketId::parse(id).unwrap())) {
            Some(EntityState::Ticket(t)) => t,
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn an_opened_ticket_is_assigned_to_the_least_loaded_connected_agent() {
        let rt = desk_runtime();
        let customer = person("c-1", "customer");
        rt.call(
            &person("disp", "dispatcher"),
            "group.open",
            r#"{"group":"exc-1","kind":"exception","members":[{"user":"c-1","role":"customer"}]}"#,
        )
        .await
        .unwrap();
        for a in [agent("a-1", "fee"), agent("a-2", "fee"), agent("q-1", "quality")] {
            connected(&rt, &a).await;
        }
        let opened = rt
            .call(&customer, "ticket.open", r#"{"ticket":"t-1","subject":"运费多收了，司机态度很差","group":"exc-1"}"#)
            .await
            .unwrap();
        let Reply::TicketsOpened { tickets } = opened else { panic!() };
        let ids: Vec<_> = tickets.iter().map(|t| (t.ticket.to_string(), t.skill_group.to_string())).collect();
        assert_eq!(ids, [("t-1".to_string(), "fee".to_string()), ("t-1.2".into(), "quality".into())]);
        settle(&rt).await;
        let fee = ticket(&rt, "t-1");
        assert_eq!(fee.status, TicketStatus::Assigned);
        assert_eq!(ticket(&rt, "t-1.2").assignee.unwrap().as_str(), "q-1");
        // The next fee ticket goes to the other fee agent.
        rt.call(&customer, "ticket.open", r#"{"ticket":"t-2","subject":"运费"}"#).await.unwrap();
        settle(&rt).await;
        assert_ne!(ticket(&rt, "t-2").assignee, fee.assignee);
        // The linked group got a system entry for each ticket and each state change.
        let log =
            rt.world.lock().unwrap().logs.get(&EntityKey::Group(GroupId::parse("exc-1").unwrap())).cloned().unwrap();
        let notes = log.iter().filter(|e| e.body.json.contains("ticket_")).count();
        assert_eq!(notes, 4, "linked and assigned, for two tickets");
        // Reopening is idempotent; the customer lists both of theirs.
        rt.call(&customer, "ticket.open", r#"{"ticket":"t-2","subject":"运费"}"#).await.unwrap();
        let Reply::TicketList { tickets } = rt.call(&customer, "ticket.list", "{}").await.unwrap() else { panic!() };
        assert_eq!(tickets.len(), 3);
        let Reply::TicketList { tickets } = rt.call(&agent("a-1", "fee"), "ticket.list", "{}").await.unwrap() else {
            panic!()
        };
        assert_eq!(tickets.len(), 2, "the fee agent sees the fee tickets only");
        assert!(!rt.world.lock().unwrap().hooks.is_empty());
    }

    #[tokio::test]
    async fn tickets_of_an_agent_away_past_the_grace_period_go_back_to_the_queue() {
        let rt = desk_runtime();
        let (away, stays) = (agent("a-1", "fee"), agent("a-2", "fee"));
        connected(&rt, &away).await;
        rt.call(&person("c-1", "customer"), "ticket.open", r#"{"ticket":"t-1","subject":"运费"}"#).await.unwrap();
        settle(&rt).await;
        assert_eq!(ticket(&rt, "t-1").assignee, Some(away.user.clone()));
        connected(&rt, &stays).await;
        gone(&rt, &away).await;
        // The grace period passes; the queue's timer fires.
        rt.world.lock().unwrap().clock += rt.cfg.tickets.agent_grace_ms + 1;
        connected(&rt, &stays).await;
        let queue = EntityKey::SkillQueue(crate::ids::SkillGroup::parse("fee").unwrap());
        rt.request(queue, fire(Timer::Queue(crate::queue::QueueTimer::Grace))).await.unwrap();
        settle(&rt).await;
        let t = ticket(&rt, "t-1");
        assert_eq!((t.status, t.assignee), (TicketStatus::Assigned, Some(stays.user.clone())));
    }

    #[tokio::test]
    async fn a_rating_given_after_the_close_counts_in_the_desk_figures() {
        let rt = desk_runtime();
        let (fee, customer) = (agent("a-1", "fee"), person("c-1", "customer"));
        connected(&rt, &fee).await;
        rt.call(&customer, "ticket.open", r#"{"ticket":"t-1","subject":"运费"}"#).await.unwrap();
        settle(&rt).await;
        rt.call(&fee, "ticket.propose", r#"{"ticket":"t-1","solution":"refund"}"#).await.unwrap();
        rt.call(&customer, "ticket.confirm", r#"{"ticket":"t-1","accepted":true}"#).await.unwrap();
        rt.call(&fee, "ticket.close", r#"{"ticket":"t-1"}"#).await.unwrap();
        settle(&rt).await;
        rt.call(&customer, "ticket.rate", r#"{"ticket":"t-1","score":4}"#).await.unwrap();
        settle(&rt).await;
        let skill = crate::ids::SkillGroup::parse("fee").unwrap();
        let Some(EntityState::SkillQueue(q)) = rt.state(&EntityKey::SkillQueue(skill.clone())) else { panic!() };
        let desk = q.desk(&skill, rt.now());
        assert_eq!((desk.csat_count, desk.csat_average, desk.resolved_total), (1, Some(4.0), 1));
        let listed: Vec<_> = q.summaries().map(|s| (s.ticket.to_string(), s.rating)).collect();
        assert_eq!(listed, [("t-1".to_string(), Some(4))], "the closed ticket is listed with its rating");
    }
}

#[tokio::test]
async fn an_apply_whose_pushes_were_another_leaders_pushes_nothing_here() {
    let rt = LocalRuntime::default();
    rt.call(&person("disp", "dispatcher"), "group.open", OPEN).await.unwrap();
    let send = r#"{"group":"exc-1","client_msg_id":"m-1","body":{"type":"text","text":"where is it"}}"#;
    rt.call(&person("driver", "driver"), "msg.send", send).await.unwrap();
    let key = EntityKey::Group(GroupId::parse("exc-1").unwrap());
    let (state, sent, pushed) = {
        let w = rt.world.lock().unwrap();
        (w.states.get(&key).cloned(), w.logs[&key].last().cloned().unwrap(), w.pushes.len())
    };

    on_applied(&key, state.as_ref(), std::slice::from_ref(&sent), &[], Pushes::Skip, &rt);
    assert_eq!(rt.world.lock().unwrap().pushes.len(), pushed, "pushed again what another leader pushed");
    on_applied(&key, state.as_ref(), std::slice::from_ref(&sent), &[], Pushes::Send, &rt);
    assert!(rt.world.lock().unwrap().pushes.len() > pushed, "this leader's apply pushes nothing");
}
