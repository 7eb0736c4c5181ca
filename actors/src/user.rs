//! A user's inbox: the groups they belong to.
//!
//! Group membership is decided by the group; the inbox is an index over it, kept on the
//! user's own shard. The runtime adds a group to the inbox *before* the group admits the
//! member, and removes it *after* the group lets them go, so a member's inbox always lists
//! the group. An inbox may briefly name a group the user is not in (one being opened, or
//! one whose opening was refused until the runtime takes it out again); readers filter those.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::entity::Applied;
use crate::error::Rejection;
use crate::ids::{GroupId, TicketId};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct UserState {
    pub groups: BTreeSet<GroupId>,
    /// Tickets the user opened as a customer.
    #[serde(default)]
    pub tickets: BTreeSet<TicketId>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum UserCommand {
    /// List `group` in the inbox, unless that would exceed `max_groups`.
    Join {
        group: GroupId,
        max_groups: u32,
    },
    Forget {
        group: GroupId,
    },
    /// List tickets the user opens, unless that would exceed `max_tickets`.
    AddTickets {
        tickets: Vec<TicketId>,
        max_tickets: u32,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum UserReply {
    Updated { changed: bool },
}

pub type UserApplied = Applied<UserReply, std::convert::Infallible>;

impl UserState {
    pub fn check(state: Option<&UserState>, cmd: &UserCommand) -> Result<(), Rejection> {
        match cmd {
            UserCommand::Join { group, max_groups } => {
                let s = state.map(|s| &s.groups);
                let listed = s.is_some_and(|g| g.contains(group));
                let count = s.map_or(0, |g| g.len());
                if !listed && count as u32 >= *max_groups {
                    return Err(Rejection::conflict(format!("the user is already in {max_groups} groups, the limit"))
                        .at_limit(crate::error::Limit::MaxGroupsPerUser));
                }
                Ok(())
            }
            UserCommand::Forget { .. } => Ok(()),
            UserCommand::AddTickets { tickets, max_tickets } => {
                let listed = state.map(|s| &s.tickets);
                let new = tickets.iter().filter(|t| !listed.is_some_and(|l| l.contains(*t))).count();
                let count = listed.map_or(0, |l| l.len());
                if new > 0 && (count + new) as u64 > u64::from(*max_tickets) {
                    return Err(Rejection::conflict(format!(
                        "the user has opened {count} tickets; {max_tickets} is the limit"
                    )));
                }
                Ok(())
            }
        }
    }

    pub fn apply(state: &mut Option<UserState>, cmd: UserCommand) -> UserApplied {
        if let Err(r) = Self::check(state.as_ref(), &cmd) {
            return Applied::rejected(r);
        }
        let s = state.get_or_insert_with(UserState::default);
        let changed = match cmd {
            UserCommand::Join { group, .. } => s.groups.insert(group),
            UserCommand::Forget { group } => s.groups.remove(&group),
            UserCommand::AddTickets { tickets, .. } => {
                let mut added = false;
                for t in tickets {
                    added |= s.tickets.insert(t);
                }
                added
            }
        };
        if changed {
            Applied::changed(UserReply::Updated { changed }, Vec::new())
        } else {
            Applied::unchanged(UserReply::Updated { changed })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(s: &str) -> GroupId {
        GroupId::parse(s).unwrap()
    }

    #[test]
    fn join_is_idempotent_and_bounded() {
        let mut s = None;
        let join = |group: &str| UserCommand::Join { group: g(group), max_groups: 2 };
        assert_eq!(UserState::apply(&mut s, join("a")).reply, Ok(UserReply::Updated { changed: true }));
        assert_eq!(UserState::apply(&mut s, join("a")).reply, Ok(UserReply::Updated { changed: false }));
        assert!(UserState::apply(&mut s, join("b")).reply.is_ok());
        let full = UserState::apply(&mut s, join("c"));
        assert_eq!(full.reply.unwrap_err().code, crate::error::ErrorCode::Conflict);
        assert!(!full.state_changed);
        // Re-joining a listed group never trips the limit.
        assert!(UserState::apply(&mut s, join("b")).reply.is_ok());
        assert!(UserState::apply(&mut s, UserCommand::Forget { group: g("a") }).state_changed);
        assert!(UserState::apply(&mut s, join("c")).reply.is_ok());
        assert_eq!(s.unwrap().groups.len(), 2);
    }
}
