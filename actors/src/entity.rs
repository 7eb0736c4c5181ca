//! What every entity shares: who is asking, what time it is, and what applying a command
//! produced.

use serde::{Deserialize, Serialize};

use crate::error::Rejection;
use crate::ids::{GroupId, SkillGroup, TicketId, UserId};

/// Milliseconds since the Unix epoch, as stamped by the leader that proposed a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct Timestamp(pub u64);

impl Timestamp {
    pub fn plus_millis(self, ms: u64) -> Timestamp {
        Timestamp(self.0.saturating_add(ms))
    }
    pub fn millis_until(self, later: Timestamp) -> u64 {
        later.0.saturating_sub(self.0)
    }
}

/// The authenticated user a command acts for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caller {
    pub user: UserId,
    /// The token carries the `admin` role: may read and write any group.
    pub admin: bool,
}

/// A storage read failed while applying. Not a rejection: the replica cannot go on.
#[derive(Debug, Clone, thiserror::Error)]
#[error("storage fault: {0}")]
pub struct StorageFault(pub String);

/// The outcome of applying one command to one entity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Applied<R, E> {
    pub reply: Result<R, Rejection>,
    pub effects: Vec<E>,
    /// The entity's state differs from before and must be stored again.
    pub state_changed: bool,
}

impl<R, E> Applied<R, E> {
    pub fn rejected(r: Rejection) -> Self {
        Applied { reply: Err(r), effects: Vec::new(), state_changed: false }
    }
    pub fn unchanged(reply: R) -> Self {
        Applied { reply: Ok(reply), effects: Vec::new(), state_changed: false }
    }
    pub fn changed(reply: R, effects: Vec<E>) -> Self {
        Applied { reply: Ok(reply), effects, state_changed: true }
    }
}

/// The kinds of entity, each a state machine of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum EntityKind {
    Group,
    User,
    Ticket,
    SkillQueue,
}

impl EntityKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EntityKind::Group => "group",
            EntityKind::User => "user",
            EntityKind::Ticket => "ticket",
            EntityKind::SkillQueue => "skill_queue",
        }
    }

    pub fn parse(s: &str) -> Option<EntityKind> {
        [EntityKind::Group, EntityKind::User, EntityKind::Ticket, EntityKind::SkillQueue]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

/// The address of one entity. Its shard is a stable hash of this key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum EntityKey {
    Group(GroupId),
    User(UserId),
    Ticket(TicketId),
    SkillQueue(SkillGroup),
}

impl EntityKey {
    pub fn kind(&self) -> EntityKind {
        match self {
            EntityKey::Group(_) => EntityKind::Group,
            EntityKey::User(_) => EntityKind::User,
            EntityKey::Ticket(_) => EntityKind::Ticket,
            EntityKey::SkillQueue(_) => EntityKind::SkillQueue,
        }
    }

    pub fn id(&self) -> &str {
        match self {
            EntityKey::Group(id) => id.as_str(),
            EntityKey::User(id) => id.as_str(),
            EntityKey::Ticket(id) => id.as_str(),
            EntityKey::SkillQueue(id) => id.as_str(),
        }
    }

    pub fn parse(kind: EntityKind, id: &str) -> Result<EntityKey, crate::ids::IdError> {
        Ok(match kind {
            EntityKind::Group => EntityKey::Group(id.parse()?),
            EntityKind::User => EntityKey::User(id.parse()?),
            EntityKind::Ticket => EntityKey::Ticket(id.parse()?),
            EntityKind::SkillQueue => EntityKey::SkillQueue(id.parse()?),
        })
    }
}

impl std::fmt::Display for EntityKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.kind().as_str(), self.id())
    }
}
