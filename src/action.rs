//! What a policy rule or an authentication verdict does. Shared by the limit
//! rules (`policy/`) and the SPF/DKIM/DMARC settings (`auth/`) so both read the
//! same in YAML; a leaf, so that neither of the two depends on the other for it.

use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
#[schemars(rename = "Action")]
pub enum PolicyAction {
    /// Do nothing (the default for verdicts a policy does not mention).
    Accept,
    /// Only record the result (Authentication-Results header).
    Tag,
    /// Temporary failure: SMTP 4xx (451/421 4.7.x), POP3 `-ERR [SYS/TEMP]`.
    Tempfail,
    /// Permanent failure: SMTP 5xx, POP3 `-ERR`.
    Reject,
    /// Slow the client down (bounded tarpit), then continue.
    Delay,
    /// Log and count what would have happened; never refuse.
    Shadow,
    /// Limit rules only (with `ban_for`): refuse the command as `reject`
    /// does and refuse the client's address on every listener for a while
    /// (`policy/bans.rs`).
    Ban,
}

impl PolicyAction {
    pub const fn as_str(self) -> &'static str {
        match self {
            PolicyAction::Accept => "accept",
            PolicyAction::Tag => "tag",
            PolicyAction::Tempfail => "tempfail",
            PolicyAction::Reject => "reject",
            PolicyAction::Delay => "delay",
            PolicyAction::Shadow => "shadow",
            PolicyAction::Ban => "ban",
        }
    }

    /// Whether this action refuses the command it applies to.
    pub fn refuses(self) -> bool {
        matches!(
            self,
            PolicyAction::Tempfail | PolicyAction::Reject | PolicyAction::Ban
        )
    }
}
