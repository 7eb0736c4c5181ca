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
        let route = ops::parse(op, &fields, who, &self.cfg, || GroupId::parse("g-auto").unwrap())?;
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
        on_applied(&key, state.as_ref(), &out.appended, &out.notices, self);
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
