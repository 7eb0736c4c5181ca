//! What an entity does on the leader beyond applying commands: refusing early, asking
//! other entities, pushing events. The runtime hosts one actor per active entity and calls
//! these functions from it; they reach the world only through [`Runtime`].

use std::future::Future;
use std::pin::Pin;

use crate::domain::{Command, DomainConfig, EntityState, Notice, Query, Reply};
use crate::entity::{Caller, EntityKey, Timestamp};
use crate::error::{ErrorCode, Rejection};
use crate::event::Event;
use crate::group::{self, Entry, GroupCommand, GroupState};
use crate::ids::{GroupId, UserId};
use crate::user::{UserCommand, UserState};

pub type ReplyFuture = Pin<Box<dyn Future<Output = Result<Reply, Rejection>> + Send + 'static>>;

/// The runtime as entities see it. Failures of the runtime itself (no leader, timeouts)
/// come back as rejections with code `unavailable` or `internal`.
pub trait Runtime: Clone + Send + Sync + 'static {
    /// The leader's clock, stamped into commands.
    fn now(&self) -> Timestamp;
    fn config(&self) -> &DomainConfig;
    /// Appends `cmd` to the log of `key`'s shard; resolves with the reply of applying it.
    fn propose(&self, key: EntityKey, cmd: Command) -> ReplyFuture;
    /// Hands `req` to the actor of `key`, wherever its leader is.
    fn request(&self, key: EntityKey, req: Request) -> ReplyFuture;
    /// A linearizable read of `key`'s committed state.
    fn query(&self, key: EntityKey, q: Query) -> ReplyFuture;
    /// Best effort: every connected device of `users` receives `event`.
    fn push(&self, users: &[UserId], event: &Event);
}

/// A request to an entity's actor: from a client, another entity or the runtime's timers.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Request {
    Group(GroupCommand),
    User(UserCommand),
    /// `inbox.sync` for the caller.
    Inbox {
        caller: Caller,
    },
}

/// How the actor answers: at once, or by a task that runs outside the actor (proposals
/// and calls to other entities), so one slow request never holds up the next.
pub enum Handling {
    Done(Result<Reply, Rejection>),
    Task(ReplyFuture),
}

impl std::fmt::Debug for Handling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Handling::Done(r) => f.debug_tuple("Done").field(r).finish(),
            Handling::Task(_) => f.write_str("Task(..)"),
        }
    }
}

fn propose<R: Runtime>(rt: &R, key: &EntityKey, cmd: Command) -> Handling {
    Handling::Task(rt.propose(key.clone(), cmd))
}

/// Handles one request on the leader. `state` is the entity's committed state.
pub fn handle<R: Runtime>(key: &EntityKey, state: Option<&EntityState>, req: Request, rt: &R) -> Handling {
    match (key, req) {
        (EntityKey::Group(id), Request::Group(cmd)) => {
            let group = match state {
                Some(EntityState::Group(g)) => Some(g),
                _ => None,
            };
            handle_group(id, group, cmd, rt)
        }
        (EntityKey::User(_), Request::User(cmd)) => {
            let user = match state {
                Some(EntityState::User(u)) => Some(u),
                _ => None,
            };
            match UserState::check(user, &cmd) {
                Err(r) => Handling::Done(Err(r)),
                Ok(()) => propose(rt, key, Command::User(cmd)),
            }
        }
        (EntityKey::User(_), Request::Inbox { caller }) => inbox_sync(key.clone(), caller, rt.clone()),
        (key, req) => Handling::Done(Err(Rejection::new(ErrorCode::Internal, format!("{key} cannot handle {req:?}")))),
    }
}

fn handle_group<R: Runtime>(id: &GroupId, state: Option<&GroupState>, cmd: GroupCommand, rt: &R) -> Handling {
    if let Err(r) = GroupState::check(state, &cmd) {
        return Handling::Done(Err(r));
    }
    let key = EntityKey::Group(id.clone());
    match cmd {
        // Reopening: the first open listed the group in every inbox before committing.
        GroupCommand::Open(_) if state.is_some() => {
            Handling::Done(Ok(Reply::Opened { group: id.clone(), created: false }))
        }
        GroupCommand::Open(_) | GroupCommand::Invite { .. } => {
            // Inboxes list the group before the group admits anyone, so a member's inbox
            // always names it (see user.rs).
            let joining = group::joining_users(&cmd);
            let rt = rt.clone();
            let group = id.clone();
            Handling::Task(Box::pin(async move {
                let max_groups = rt.config().max_groups_per_user;
                let joins = joining.iter().map(|user| {
                    let join = UserCommand::Join { group: group.clone(), max_groups };
                    let reply = rt.request(EntityKey::User(user.clone()), Request::User(join));
                    async move { reply.await.map_err(|r| Rejection { message: format!("{user}: {}", r.message), ..r }) }
                });
                for joined in futures::future::join_all(joins).await {
                    joined?;
                }
                rt.propose(key, Command::Group(cmd)).await
            }))
        }
        GroupCommand::Remove { ref user, .. } | GroupCommand::Leave { ref user } => {
            let user = user.clone();
            let rt = rt.clone();
            let group = id.clone();
            Handling::Task(Box::pin(async move {
                let reply = rt.propose(key, Command::Group(cmd)).await?;
                if reply == (Reply::Updated { changed: true }) {
                    // Best effort: an inbox that still names the group is filtered on read.
                    let forget = Request::User(UserCommand::Forget { group });
                    let _ = rt.request(EntityKey::User(user), forget).await;
                }
                Ok(reply)
            }))
        }
        cmd => propose(rt, &key, Command::Group(cmd)),
    }
}

/// Most groups an `inbox.sync` queries at once.
const INBOX_QUERY_CONCURRENCY: usize = 64;

fn inbox_sync<R: Runtime>(key: EntityKey, caller: Caller, rt: R) -> Handling {
    Handling::Task(Box::pin(async move {
        use futures::StreamExt;
        let user = caller.user.clone();
        let Reply::InboxGroups(groups) = rt.query(key, Query::InboxGroups { caller }).await? else {
            return Err(Rejection::new(ErrorCode::Internal, "inbox query answered something else"));
        };
        let lines: Vec<_> = futures::stream::iter(groups)
            .map(|g| rt.query(EntityKey::Group(g), Query::InboxItem { user: user.clone() }))
            .buffered(INBOX_QUERY_CONCURRENCY)
            .collect()
            .await;
        let mut groups = Vec::with_capacity(lines.len());
        for line in lines {
            if let Reply::InboxItem(Some(line)) = line? {
                groups.push(line);
            }
        }
        Ok(Reply::Inbox { groups })
    }))
}

/// Acts on what applying a command produced, on the leader. `state` is the state after it.
pub fn on_applied<R: Runtime>(
    key: &EntityKey,
    state: Option<&EntityState>,
    appended: &[Entry],
    notices: &[Notice],
    rt: &R,
) {
    let (EntityKey::Group(id), Some(EntityState::Group(g))) = (key, state) else {
        return;
    };
    let mut audience: Vec<UserId> = g.member_ids().cloned().collect();
    // Someone removed still gets the entry that says so.
    for n in notices {
        if let Notice::MemberGone { user } = n {
            audience.push(user.clone());
        }
    }
    for entry in appended {
        rt.push(&audience, &Event::Msg { group: id.clone(), entry: entry.clone() });
    }
    for n in notices {
        if let Notice::ReadMoved { user, read_seq } = n {
            rt.push(&audience, &Event::Receipt { group: id.clone(), user: user.clone(), read_seq: *read_seq });
        }
    }
}

#[cfg(test)]
mod tests;
