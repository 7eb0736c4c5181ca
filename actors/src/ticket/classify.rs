//! Classification: which categories a ticket's text belongs to, and how urgent it is.
//! The rules come from the configuration; the gateway classifies before proposing, so
//! every replica stores the same answer whatever its own rules say.

use serde::{Deserialize, Serialize};

use super::Priority;
use crate::ids::SkillGroup;
use crate::principal::Tier;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Category {
    pub name: String,
    pub skill_group: SkillGroup,
    pub priority: Priority,
    /// Lower-cased; matched by `mentions`.
    pub keywords: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rules {
    pub categories: Vec<Category>,
    /// Text that matches no category opens one ticket here.
    pub fallback: Category,
    /// Any of these raises the priority one step.
    pub urgency_words: Vec<String>,
}

impl Rules {
    /// Lower-cases every keyword once, so matching never has to.
    pub fn new(categories: Vec<Category>, fallback: Category, urgency_words: Vec<String>) -> Rules {
        let lower = |words: Vec<String>| words.into_iter().map(|w| w.to_lowercase()).collect::<Vec<_>>();
        Rules {
            categories: categories.into_iter().map(|c| Category { keywords: lower(c.keywords), ..c }).collect(),
            fallback,
            urgency_words: lower(urgency_words),
        }
    }

    /// Every skill group a ticket can be routed to.
    pub fn skill_groups(&self) -> Vec<SkillGroup> {
        let mut all: Vec<SkillGroup> =
            self.categories.iter().chain([&self.fallback]).map(|c| c.skill_group.clone()).collect();
        all.push(super::review_skill_group());
        all.sort();
        all.dedup();
        all
    }
}

/// One ticket to open: its category, where it goes and how urgent it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Classified {
    pub category: String,
    pub skill_group: SkillGroup,
    pub priority: Priority,
}

/// The categories `subject` and `description` match, in rule order (the fallback when
/// none does). Urgency words and a VIP customer each raise every ticket's priority a step.
pub fn classify(rules: &Rules, subject: &str, description: &str, tier: Tier) -> Vec<Classified> {
    let text = format!("{subject}\n{description}").to_lowercase();
    let mut matched: Vec<&Category> =
        rules.categories.iter().filter(|c| c.keywords.iter().any(|k| mentions(&text, k))).collect();
    if matched.is_empty() {
        matched.push(&rules.fallback);
    }
    let urgent = rules.urgency_words.iter().any(|w| mentions(&text, w));
    matched
        .into_iter()
        .map(|c| {
            let mut priority = c.priority;
            if urgent {
                priority = priority.raised();
            }
            if tier == Tier::Vip {
                priority = priority.raised();
            }
            Classified { category: c.name.clone(), skill_group: c.skill_group.clone(), priority }
        })
        .collect()
}

/// Whether lower-cased `text` contains `keyword`. Where the keyword starts or ends with a
/// Latin letter or digit, the text must not continue the word there: `late` is not found in
/// "latest", nor `fee` in "feedback". Chinese has no spaces between words, so a keyword
/// that starts and ends with Chinese characters is found anywhere.
pub fn mentions(text: &str, keyword: &str) -> bool {
    let is_word = |c: char| c.is_ascii_alphanumeric();
    let (Some(first), Some(last)) = (keyword.chars().next(), keyword.chars().last()) else { return false };
    text.match_indices(keyword).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = text[at + keyword.len()..].chars().next();
        let joins_before = is_word(first) && before.is_some_and(is_word);
        let joins_after = is_word(last) && after.is_some_and(is_word);
        !joins_before && !joins_after
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        let cat = |name: &str, skill: &str, priority, words: &[&str]| Category {
            name: name.into(),
            skill_group: SkillGroup::parse(skill).unwrap(),
            priority,
            keywords: words.iter().map(|w| w.to_string()).collect(),
        };
        Rules::new(
            vec![
                cat("delivery_delay", "delivery", Priority::High, &["未按约定时间", "Delay"]),
                cat("service_attitude", "quality", Priority::Normal, &["态度"]),
            ],
            cat("other", "general", Priority::Normal, &[]),
            vec!["紧急".into(), "URGENT".into()],
        )
    }

    #[test]
    fn several_matches_open_one_ticket_each_in_rule_order() {
        let got = classify(&rules(), "司机未按约定时间到达且态度恶劣", "", Tier::Standard);
        let names: Vec<_> = got.iter().map(|c| (c.category.as_str(), c.priority)).collect();
        assert_eq!(names, [("delivery_delay", Priority::High), ("service_attitude", Priority::Normal)]);
    }

    #[test]
    fn matching_ignores_case_and_falls_back() {
        assert_eq!(classify(&rules(), "", "big DELAY", Tier::Standard)[0].category, "delivery_delay");
        let other = classify(&rules(), "hello", "", Tier::Standard);
        assert_eq!((other.len(), other[0].category.as_str()), (1, "other"));
    }

    #[test]
    fn latin_keywords_match_whole_words_and_chinese_ones_anywhere() {
        for (text, keyword, found) in [
            ("my parcel is late", "late", true),
            ("late.", "late", true),
            ("the latest news", "late", false),
            ("i will pay later", "late", false),
            ("some feedback", "fee", false),
            ("the fee, again", "fee", true),
            ("my ipod", "pod", false),
            ("no-show today", "no-show", true),
            ("不是no-show啊", "no-show", true),
            ("费用超时费", "超时费", true),
            ("", "late", false),
            ("anything", "", false),
        ] {
            assert_eq!(mentions(text, keyword), found, "{keyword:?} in {text:?}");
        }
    }

    #[test]
    fn urgency_and_vip_each_raise_one_step_up_to_urgent() {
        assert_eq!(classify(&rules(), "态度 urgent", "", Tier::Standard)[0].priority, Priority::High);
        assert_eq!(classify(&rules(), "态度 紧急", "", Tier::Vip)[0].priority, Priority::Urgent);
        assert_eq!(classify(&rules(), "delay 紧急", "", Tier::Vip)[0].priority, Priority::Urgent);
    }
}
