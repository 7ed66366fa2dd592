//! What can go wrong decoding or encoding, and the reason code each error puts on the wire.

use crate::ReasonCode;
use crate::packet::PacketType;

/// A decoding failure. Each variant's message names the normative statement it enforces
/// (`[MQTT-x.y.z-n]`, 5.0 numbering unless marked 3.1.1) or, where the standard states the
/// rule without a numbered statement, its section (`[§x.y.z]`); and [`DecodeError::reason_code`] picks the MQTT 5 reason
/// code a server sends in CONNACK or DISCONNECT before closing the connection. MQTT 3.x
/// peers are simply disconnected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Packet type 0 is reserved; 15 (AUTH) exists only in 5.0.
    #[error("[§2.1.2] packet type {0} is reserved for this protocol version")]
    ReservedPacketType(u8),
    /// Fixed-header flags other than the ones the spec fixes for this packet type.
    #[error("[MQTT-2.1.3-1] reserved fixed header flags {flags:#06b} on {packet:?}")]
    ReservedFlags {
        /// The packet type.
        packet: PacketType,
        /// The low four bits of the first byte.
        flags: u8,
    },
    /// A variable byte integer (remaining length, property length, ...) with a fifth byte.
    #[error("[§1.5.5] variable byte integer longer than 4 bytes")]
    VarIntTooLong,
    /// The packet's announced size is above the configured maximum; detected from the fixed
    /// header alone, before the body is buffered.
    #[error("[§3.2.2.3.6] packet of {size} bytes exceeds the maximum packet size {max}")]
    PacketTooLarge {
        /// Total size announced (fixed header + remaining length).
        size: usize,
        /// The configured maximum.
        max: u32,
    },
    /// The body ended before a field it announced.
    #[error("[§1.5] packet ends in the middle of a field")]
    Truncated,
    /// Bytes left over after the last field of a packet.
    #[error("[§2.1.4] {0} unexpected bytes after the end of the packet")]
    TrailingBytes(usize),
    /// A string that is not well-formed UTF-8.
    #[error("[MQTT-1.5.4-1] string is not well-formed UTF-8")]
    InvalidUtf8,
    /// A string containing an encoded UTF-16 surrogate (U+D800..U+DFFF).
    #[error("[MQTT-1.5.4-1] string contains a UTF-16 surrogate code point")]
    Surrogate,
    /// A string containing U+0000.
    #[error("[MQTT-1.5.4-2] string contains the null character U+0000")]
    NullCharacter,
    /// A topic name with `+` or `#`.
    #[error("[MQTT-3.3.2-2] topic name contains a wildcard character")]
    TopicNameWildcard,
    /// An empty topic name (without a topic alias) or an empty topic filter.
    #[error("[MQTT-4.7.3-1] topic names and topic filters must be at least one character long")]
    EmptyTopic,
    /// `#` that is not the whole last level of a filter.
    #[error("[MQTT-4.7.1-1] '#' must be the last character and occupy a whole level")]
    MultiLevelWildcardPlacement,
    /// `+` that does not occupy a whole level.
    #[error("[MQTT-4.7.1-2] '+' must occupy an entire level of the filter")]
    SingleLevelWildcardPlacement,
    /// `$share/` with an empty share name or one holding `+` or `#`.
    #[error("[MQTT-4.8.2-1] share name must be at least one character without '/', '+' or '#'")]
    InvalidShareName,
    /// `$share/{group}` not followed by `/` and a topic filter.
    #[error("[MQTT-4.8.2-2] shared subscription must be $share/{{ShareName}}/{{filter}}")]
    MissingShareFilter,
    /// A packet id of 0 where one is required.
    #[error("[MQTT-2.2.1-3] packet identifier must be non-zero")]
    ZeroPacketId,
    /// QoS bits set to 3.
    #[error("[MQTT-3.3.1-4] QoS 3 is not a valid QoS")]
    InvalidQos,
    /// DUP set on a QoS 0 PUBLISH.
    #[error("[MQTT-3.3.1-2] DUP must be 0 on a QoS 0 PUBLISH")]
    DupOnQos0,
    /// Protocol name other than `MQTT` (or `MQIsdp` at level 3).
    #[error("[MQTT-3.1.2-1] unknown protocol name")]
    InvalidProtocolName,
    /// A protocol level this codec does not speak.
    #[error("[MQTT-3.1.2-2] unsupported protocol level {0}")]
    UnsupportedProtocolLevel(u8),
    /// CONNECT flags bit 0 set.
    #[error("[MQTT-3.1.2-3] CONNECT reserved flag must be 0")]
    ConnectReservedFlag,
    /// Will QoS or Will Retain set without the Will Flag.
    #[error(
        "[MQTT-3.1.2-11] [MQTT-3.1.2-13] will QoS and will retain must be 0 when the will flag is 0"
    )]
    WillFlagsWithoutWill,
    /// Will QoS 3.
    #[error("[MQTT-3.1.2-12] will QoS 3 is not a valid QoS")]
    InvalidWillQos,
    /// MQTT 3.1/3.1.1: password flag without the user name flag.
    #[error("[MQTT-3.1.2-22] password flag set without the user name flag (MQTT 3.1.1)")]
    PasswordWithoutUsername,
    /// CONNACK acknowledge flags with reserved bits set, or session present on a failure.
    #[error("[MQTT-3.2.2-1] CONNACK reserved flags set")]
    ConnAckReservedFlags,
    /// A property identifier the spec does not define.
    #[error("[§2.2.2.2] unknown property identifier {0:#04x}")]
    UnknownProperty(u32),
    /// A property that this packet type must not carry.
    #[error("[§2.2.2.2] property {id:#04x} is not allowed on {packet}")]
    PropertyNotAllowed {
        /// The property identifier.
        id: u8,
        /// Which packet or property list.
        packet: &'static str,
    },
    /// A property the spec allows at most once, repeated.
    #[error("[§2.2.2.2] property {0:#04x} appears more than once")]
    DuplicateProperty(u8),
    /// A property whose value is out of its range (0 where non-zero is required, a boolean
    /// other than 0 or 1, ...).
    #[error("[§2.2.2.2] property {0:#04x} has a value outside its range")]
    InvalidPropertyValue(u8),
    /// Topic Alias 0.
    #[error("[MQTT-3.3.2-8] topic alias 0 is not permitted")]
    ZeroTopicAlias,
    /// Authentication Data without Authentication Method.
    #[error("[§3.1.2.11.10] authentication data without an authentication method")]
    AuthDataWithoutMethod,
    /// SUBSCRIBE with no topic filter.
    #[error("[MQTT-3.8.3-2] SUBSCRIBE must contain at least one topic filter")]
    EmptySubscribe,
    /// UNSUBSCRIBE with no topic filter.
    #[error("[MQTT-3.10.3-2] UNSUBSCRIBE must contain at least one topic filter")]
    EmptyUnsubscribe,
    /// Subscription options with reserved bits set.
    #[error("[MQTT-3.8.3-5] subscription options reserved bits must be 0")]
    SubscriptionOptionsReserved,
    /// Retain Handling 3.
    #[error("[§3.8.3.1] retain handling 3 is not valid")]
    InvalidRetainHandling,
    /// A reason code that this packet type cannot carry.
    #[error("[§2.4] reason code {code:#04x} is not valid for {packet:?}")]
    InvalidReasonCode {
        /// The packet type.
        packet: PacketType,
        /// The code received.
        code: u8,
    },
    /// A Subscription Identifier of 0.
    #[error("[§3.8.2.1.2] subscription identifier must be 1 to 268,435,455")]
    ZeroSubscriptionId,
}

impl DecodeError {
    /// The MQTT 5 reason code to send in CONNACK (before a session exists) or DISCONNECT.
    pub fn reason_code(&self) -> ReasonCode {
        use DecodeError as E;
        match self {
            E::PacketTooLarge { .. } => ReasonCode::PacketTooLarge,
            E::UnsupportedProtocolLevel(_) | E::InvalidProtocolName => {
                ReasonCode::UnsupportedProtocolVersion
            }
            E::TopicNameWildcard => ReasonCode::TopicNameInvalid,
            E::MultiLevelWildcardPlacement
            | E::SingleLevelWildcardPlacement
            | E::InvalidShareName
            | E::MissingShareFilter => ReasonCode::TopicFilterInvalid,
            E::ZeroTopicAlias => ReasonCode::TopicAliasInvalid,
            E::EmptyTopic
            | E::ZeroPacketId
            | E::DupOnQos0
            | E::DuplicateProperty(_)
            | E::InvalidPropertyValue(_)
            | E::AuthDataWithoutMethod
            | E::EmptySubscribe
            | E::EmptyUnsubscribe
            | E::InvalidRetainHandling
            | E::InvalidReasonCode { .. }
            | E::ZeroSubscriptionId => ReasonCode::ProtocolError,
            E::ReservedPacketType(_)
            | E::ReservedFlags { .. }
            | E::VarIntTooLong
            | E::Truncated
            | E::TrailingBytes(_)
            | E::InvalidUtf8
            | E::Surrogate
            | E::NullCharacter
            | E::InvalidQos
            | E::ConnectReservedFlag
            | E::WillFlagsWithoutWill
            | E::InvalidWillQos
            | E::PasswordWithoutUsername
            | E::ConnAckReservedFlags
            | E::UnknownProperty(_)
            | E::PropertyNotAllowed { .. }
            | E::SubscriptionOptionsReserved => ReasonCode::MalformedPacket,
        }
    }
}

/// An encoding failure: the packet cannot be represented on the wire in this version.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// A string or binary field longer than 65,535 bytes.
    #[error("[§1.5.4] string or binary field of {0} bytes exceeds 65,535")]
    FieldTooLong(usize),
    /// The whole packet is larger than the protocol's 268,435,455-byte remaining length.
    #[error("[§2.1.4] remaining length {0} exceeds 268,435,455")]
    PacketTooLarge(usize),
    /// The packet type does not exist in this protocol version (AUTH before 5.0).
    #[error("{packet:?} does not exist in {protocol}")]
    NotInProtocol {
        /// The packet type.
        packet: PacketType,
        /// The version it was to be written in.
        protocol: crate::Protocol,
    },
    /// A CONNACK reason that MQTT 3.x has no return code for; the server closes the
    /// connection without a CONNACK instead.
    #[error("CONNACK reason {0:?} has no MQTT 3.1.1 return code")]
    NoV3ReturnCode(ReasonCode),
    /// An empty topic name on a PUBLISH without a topic alias (or in MQTT 3.x, which has no
    /// aliases).
    #[error("[MQTT-4.7.3-1] empty topic name without a topic alias")]
    EmptyTopic,
    /// SUBSCRIBE or UNSUBSCRIBE with no topic filter.
    #[error("[MQTT-3.8.3-2] SUBSCRIBE and UNSUBSCRIBE need at least one topic filter")]
    NoTopicFilters,
    /// Maximum QoS 2 in CONNACK: the property is omitted to mean QoS 2.
    #[error("[§3.2.2.3.4] Maximum QoS property can only be 0 or 1; omit it for 2")]
    MaximumQos2,
    /// MQTT 3.x CONNECT with a password but no user name.
    #[error("[MQTT-3.1.2-22] MQTT 3.x cannot carry a password without a user name")]
    PasswordWithoutUsername,
}
