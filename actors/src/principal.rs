//! Who is connected: the identity a client proves with its token.

use serde::{Deserialize, Serialize};

use crate::entity::Caller;
use crate::error::Rejection;
use crate::ids::{SYSTEM_USER, SkillGroup, UserId};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Customer,
    Driver,
    Agent,
    Dispatcher,
    Station,
    Admin,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "customer" => Role::Customer,
            "driver" => Role::Driver,
            "agent" => Role::Agent,
            "dispatcher" => Role::Dispatcher,
            "station" => Role::Station,
            "admin" => Role::Admin,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    Vip,
    #[default]
    Standard,
}

/// An authenticated user, as their token describes them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Principal {
    pub user: UserId,
    pub roles: Vec<Role>,
    pub skills: Vec<SkillGroup>,
    pub tier: Tier,
    /// Tickets this agent works at once, when the token sets it (`tickets.agent_capacity`
    /// otherwise): agents differ, and their identity provider knows by how much.
    pub capacity: Option<u32>,
}

pub const MAX_ROLES: usize = 6;
pub const MAX_SKILLS: usize = 32;
/// The largest per-agent capacity a token may claim.
pub const MAX_AGENT_CAPACITY: u32 = 100;

impl Principal {
    /// Validates token claims (already signature-checked by the gateway).
    pub fn from_claims(
        sub: &str,
        roles: &[String],
        skills: &[String],
        tier: Option<&str>,
    ) -> Result<Principal, Rejection> {
        let unauthorized = |m: String| Rejection::new(crate::ErrorCode::Unauthorized, m);
        let user = UserId::parse(sub).map_err(|e| unauthorized(format!("token sub: {e}")))?;
        if user.as_str() == SYSTEM_USER {
            return Err(unauthorized(format!("token sub {SYSTEM_USER:?} is reserved for the server")));
        }
        if roles.is_empty() || roles.len() > MAX_ROLES {
            return Err(unauthorized(format!("token roles must list 1..{MAX_ROLES} roles")));
        }
        let mut parsed = Vec::with_capacity(roles.len());
        for r in roles {
            parsed.push(Role::parse(r).ok_or_else(|| unauthorized(format!("token role {r:?} is not a Convoy role")))?);
        }
        parsed.sort();
        parsed.dedup();
        if skills.len() > MAX_SKILLS {
            return Err(unauthorized(format!("token lists more than {MAX_SKILLS} skills")));
        }
        let skills = skills
            .iter()
            .map(|s| SkillGroup::parse(s).map_err(|e| unauthorized(format!("token skill: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let tier = match tier {
            None | Some("standard") => Tier::Standard,
            Some("vip") => Tier::Vip,
            Some(other) => return Err(unauthorized(format!("token tier {other:?} is neither vip nor standard"))),
        };
        Ok(Principal { user, roles: parsed, skills, tier, capacity: None })
    }

    /// Adds the token's `capacity` claim (1..=[`MAX_AGENT_CAPACITY`]).
    pub fn with_capacity(self, capacity: Option<u32>) -> Result<Principal, Rejection> {
        match capacity {
            Some(c) if !(1..=MAX_AGENT_CAPACITY).contains(&c) => Err(Rejection::new(
                crate::ErrorCode::Unauthorized,
                format!("token capacity {c} is outside 1..{MAX_AGENT_CAPACITY}"),
            )),
            capacity => Ok(Principal { capacity, ..self }),
        }
    }

    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    pub fn caller(&self) -> Caller {
        Caller { user: self.user.clone(), admin: self.has(Role::Admin) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn claims_become_a_principal() {
        let p = Principal::from_claims("a-5", &strings(&["agent", "admin"]), &strings(&["fee"]), Some("vip")).unwrap();
        assert!(p.has(Role::Agent) && p.caller().admin);
        assert_eq!(p.tier, Tier::Vip);
        assert_eq!(p.clone().with_capacity(Some(3)).unwrap().capacity, Some(3));
        for bad in [0, MAX_AGENT_CAPACITY + 1] {
            assert_eq!(p.clone().with_capacity(Some(bad)).unwrap_err().code, crate::ErrorCode::Unauthorized);
        }
    }

    #[test]
    fn bad_claims_are_unauthorized() {
        for (sub, roles, tier) in [
            ("", vec!["driver"], None),
            ("system", vec!["driver"], None),
            ("u1", vec![], None),
            ("u1", vec!["pilot"], None),
            ("u1", vec!["driver"], Some("gold")),
        ] {
            let err = Principal::from_claims(sub, &strings(&roles), &[], tier).unwrap_err();
            assert_eq!(err.code, crate::ErrorCode::Unauthorized, "{sub} {roles:?}");
        }
    }
}
