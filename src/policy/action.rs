//! What a policy rule or an authentication verdict does. Shared by the limit
//! rules and the SPF/DKIM/DMARC settings so both read the same in YAML.

use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Action {
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
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Accept => "accept",
            Action::Tag => "tag",
            Action::Tempfail => "tempfail",
            Action::Reject => "reject",
            Action::Delay => "delay",
            Action::Shadow => "shadow",
        }
    }

    /// Whether this action refuses the command it applies to.
    pub fn refuses(self) -> bool {
        matches!(self, Action::Tempfail | Action::Reject)
    }
}
