//! MQTT 5 properties (section 2.2.2), typed per packet.
//!
//! Each packet's property list is a struct generated from one table by `properties!`: one
//! field per property the packet may carry, `Option` for those allowed once and `Vec` for
//! those that may repeat (User Property in order with repeated keys, and a PUBLISH's
//! Subscription Identifiers). Decoding rejects unknown identifiers and identifiers not
//! allowed on the packet (Malformed Packet), and repeats of a once-only property (Protocol
//! Error), in this one place for every packet. Properties are written in ascending
//! identifier order (the order paho-mqtt writes them in, so its packets re-encode byte for
//! byte); reading accepts any order.

use std::fmt;
use std::num::{NonZeroU16, NonZeroU32};
use std::ops::{Deref, DerefMut};

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::{DecodeError, EncodeError};
use crate::topic::TopicName;
use crate::types::{Protocol, QoS, Str};
use crate::wire::{Reader, VARINT_MAX, binary_len, put_binary, put_str, put_varint, varint_len};

/// Property identifiers (Table 2-4 of the 5.0 standard).
pub mod id {
    #![allow(missing_docs)]
    pub const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
    pub const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
    pub const CONTENT_TYPE: u8 = 0x03;
    pub const RESPONSE_TOPIC: u8 = 0x08;
    pub const CORRELATION_DATA: u8 = 0x09;
    pub const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
    pub const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
    pub const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
    pub const SERVER_KEEP_ALIVE: u8 = 0x13;
    pub const AUTHENTICATION_METHOD: u8 = 0x15;
    pub const AUTHENTICATION_DATA: u8 = 0x16;
    pub const REQUEST_PROBLEM_INFORMATION: u8 = 0x17;
    pub const WILL_DELAY_INTERVAL: u8 = 0x18;
    pub const REQUEST_RESPONSE_INFORMATION: u8 = 0x19;
    pub const RESPONSE_INFORMATION: u8 = 0x1A;
    pub const SERVER_REFERENCE: u8 = 0x1C;
    pub const REASON_STRING: u8 = 0x1F;
    pub const RECEIVE_MAXIMUM: u8 = 0x21;
    pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
    pub const TOPIC_ALIAS: u8 = 0x23;
    pub const MAXIMUM_QOS: u8 = 0x24;
    pub const RETAIN_AVAILABLE: u8 = 0x25;
    pub const USER_PROPERTY: u8 = 0x26;
    pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
    pub const WILDCARD_SUBSCRIPTION_AVAILABLE: u8 = 0x28;
    pub const SUBSCRIPTION_IDENTIFIER_AVAILABLE: u8 = 0x29;
    pub const SHARED_SUBSCRIPTION_AVAILABLE: u8 = 0x2A;

    /// Whether the standard defines this identifier at all.
    pub fn is_known(id: u8) -> bool {
        matches!(id, 0x01..=0x03 | 0x08 | 0x09 | 0x0B | 0x11..=0x13 | 0x15..=0x1A | 0x1C | 0x1F | 0x21..=0x2A)
    }
}

/// A User Property: a name/value string pair. Order and repeated names are preserved.
pub type UserProperty = (Str, Str);

/// Payload Format Indicator: unspecified bytes or UTF-8 text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PayloadFormat {
    /// 0: unspecified bytes.
    Unspecified,
    /// 1: UTF-8 encoded character data.
    Utf8,
}

/// A Subscription Identifier: 1 to 268,435,455, written as a variable byte integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubscriptionId(NonZeroU32);

impl SubscriptionId {
    /// The identifier, if in range.
    pub fn new(value: u32) -> Option<SubscriptionId> {
        if value > VARINT_MAX {
            return None;
        }
        NonZeroU32::new(value).map(SubscriptionId)
    }

    /// The numeric value.
    pub fn get(self) -> u32 {
        self.0.get()
    }
}

/// A packet's property list, held behind one pointer that is null when the list is empty,
/// so packets without properties (every 3.x packet, most 5.0 ones) stay small and cheap to
/// move. Reading goes through `Deref` to the list or to a shared empty one; writing through
/// `DerefMut` allocates the list on first use. Equality, `Debug` and `Default` are those of
/// the list, so an absent list equals an empty one.
#[derive(Clone)]
pub struct Props<T>(Option<Box<T>>);

/// Implemented by every generated property list; the hidden methods serve [`Props`].
pub trait PropertyList: Default + PartialEq + Eq + fmt::Debug + Clone + 'static {
    #[doc(hidden)]
    fn empty_ref() -> &'static Self;
    #[doc(hidden)]
    fn list_len(&self) -> usize;
    #[doc(hidden)]
    fn write_list(&self, out: &mut BytesMut) -> Result<(), EncodeError>;
}

impl<T: PropertyList> Props<T> {
    /// No properties.
    pub const NONE: Props<T> = Props(None);

    /// Wraps a list, keeping no allocation if it is empty.
    pub fn new(list: T) -> Props<T> {
        if list == *T::empty_ref() {
            Props(None)
        } else {
            Props(Some(Box::new(list)))
        }
    }

    /// True when no property is set.
    pub fn is_empty(&self) -> bool {
        self.0.as_deref().is_none_or(|list| list == T::empty_ref())
    }

    /// Bytes of the property length and the properties in `v`: none in 3.x.
    pub(crate) fn wire_len(&self, v: Protocol) -> usize {
        match (&self.0, v.is_v5()) {
            (_, false) => 0,
            (None, true) => 1,
            (Some(list), true) => {
                let len = list.list_len();
                varint_len(len) + len
            }
        }
    }

    /// Writes the property length and the properties in 5.0; nothing in 3.x.
    pub(crate) fn write(&self, v: Protocol, out: &mut BytesMut) -> Result<(), EncodeError> {
        match (&self.0, v.is_v5()) {
            (_, false) => Ok(()),
            (None, true) => {
                out.put_u8(0);
                Ok(())
            }
            (Some(list), true) => {
                put_varint(out, list.list_len());
                list.write_list(out)
            }
        }
    }
}

impl<T: PropertyList> Default for Props<T> {
    fn default() -> Self {
        Props(None)
    }
}

impl<T: PropertyList> Deref for Props<T> {
    type Target = T;
    fn deref(&self) -> &T {
        match &self.0 {
            Some(list) => list,
            None => T::empty_ref(),
        }
    }
}

impl<T: PropertyList> DerefMut for Props<T> {
    fn deref_mut(&mut self) -> &mut T {
        self.0.get_or_insert_with(Default::default)
    }
}

impl<T: PropertyList> PartialEq for Props<T> {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl<T: PropertyList> Eq for Props<T> {}

impl<T: PropertyList> fmt::Debug for Props<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

impl<T: PropertyList> From<T> for Props<T> {
    fn from(list: T) -> Props<T> {
        Props::new(list)
    }
}

/// How one property value is read and written.
pub(crate) trait PropValue: Sized {
    fn read(r: &mut Reader, id: u8) -> Result<Self, DecodeError>;
    fn wire_len(&self) -> usize;
    fn write(&self, out: &mut BytesMut) -> Result<(), EncodeError>;
}

impl PropValue for u16 {
    fn read(r: &mut Reader, _: u8) -> Result<Self, DecodeError> {
        r.u16()
    }
    fn wire_len(&self) -> usize {
        2
    }
    fn write(&self, out: &mut BytesMut) -> Result<(), EncodeError> {
        out.put_u16(*self);
        Ok(())
    }
}

impl PropValue for u32 {
    fn read(r: &mut Reader, _: u8) -> Result<Self, DecodeError> {
        r.u32()
    }
    fn wire_len(&self) -> usize {
        4
    }
    fn write(&self, out: &mut BytesMut) -> Result<(), EncodeError> {
        out.put_u32(*self);
        Ok(())
    }
}

impl PropValue for NonZeroU16 {
    fn read(r: &mut Reader, id: u8) -> Result<Self, DecodeError> {
        NonZeroU16::new(r.u16()?).ok_or(if id == id::TOPIC_ALIAS {
            DecodeError::ZeroTopicAlias
        } else {
            DecodeError::InvalidPropertyValue(id)
        })
    }
    fn wire_len(&self) -> usize {
        2
    }
    fn write(&self, out: &mut BytesMut) -> Result<(), EncodeError> {
        out.put_u16(self.get());
        Ok(())
    }
}

impl PropValue for NonZeroU32 {
    fn read(r: &mut Reader, id: u8) -> Result<Self, DecodeError> {
        NonZeroU32::new(r.u32()?).ok_or(DecodeError::InvalidPropertyValue(id))
    }
    fn wire_len(&self) -> usize {
        4
    }
    fn write(&self, out: &mut BytesMut) -> Result<(), EncodeError> {
        out.put_u32(self.get());
        Ok(())
    }
}

impl PropValue for bool {
    fn read(r: &mut Reader, id: u8) -> Result<Self, DecodeError> {
        match r.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(DecodeError::InvalidPropertyValue(id)),
        }
    }
    fn wire_len(&self) -> usize {
        1
    }
    fn write(&self, out: &mut BytesMut) -> Result<(), EncodeError> {
        out.put_u8(u8::from(*self));
        Ok(())
    }
}

impl PropValue for PayloadFormat {
    fn read(r: &mut Reader, id: u8) -> Result<Self, DecodeError> {
        match bool::read(r, id)? {
            false => Ok(PayloadFormat::Unspecified),
            true => Ok(PayloadFormat::Utf8),
        }
    }
    fn wire_len(&self) -> usize {
        1
    }
    fn write(&self, out: &mut BytesMut) -> Result<(), EncodeError> {
        (*self == PayloadFormat::Utf8).write(out)
    }
}

/// Maximum QoS (CONNACK) may only be 0 or 1.
impl PropValue for QoS {
    fn read(r: &mut Reader, id: u8) -> Result<Self, DecodeError> {
        match bool::read(r, id)? {
            false => Ok(QoS::AtMostOnce),
            true => Ok(QoS::AtLeastOnce),
        }
    }
    fn wire_len(&self) -> usize {
        1
    }
    fn write(&self, out: &mut BytesMut) -> Result<(), EncodeError> {
        // A server supporting QoS 2 omits the property; 2 on the wire is a protocol error.
        if *self == QoS::ExactlyOnce {
            return Err(EncodeError::MaximumQos2);
        }
        out.put_u8(*self as u8);
        Ok(())
    }
}

impl PropValue for SubscriptionId {
    fn read(r: &mut Reader, _: u8) -> Result<Self, DecodeError> {
        NonZeroU32::new(r.varint()?)
            .map(SubscriptionId)
            .ok_or(DecodeError::ZeroSubscriptionId)
    }
    fn wire_len(&self) -> usize {
        varint_len(self.get() as usize)
    }
    fn write(&self, out: &mut BytesMut) -> Result<(), EncodeError> {
        put_varint(out, self.get() as usize);
        Ok(())
    }
}

impl PropValue for Str {
    fn read(r: &mut Reader, _: u8) -> Result<Self, DecodeError> {
        r.string()
    }
    fn wire_len(&self) -> usize {
        binary_len(self.as_bytes())
    }
    fn write(&self, out: &mut BytesMut) -> Result<(), EncodeError> {
        put_str(out, self)
    }
}

/// Response Topic: a topic name, so no wildcards [MQTT-3.3.2-14] and not empty.
impl PropValue for TopicName {
    fn read(r: &mut Reader, _: u8) -> Result<Self, DecodeError> {
        let len = r.u16()? as usize;
        let topic = TopicName::from_wire(r.take(len)?)?;
        if topic.is_empty() {
            return Err(DecodeError::EmptyTopic);
        }
        Ok(topic)
    }
    fn wire_len(&self) -> usize {
        binary_len(self.as_str().as_bytes())
    }
    fn write(&self, out: &mut BytesMut) -> Result<(), EncodeError> {
        put_str(out, self.as_str())
    }
}

impl PropValue for Bytes {
    fn read(r: &mut Reader, _: u8) -> Result<Self, DecodeError> {
        r.binary()
    }
    fn wire_len(&self) -> usize {
        binary_len(self)
    }
    fn write(&self, out: &mut BytesMut) -> Result<(), EncodeError> {
        put_binary(out, self)
    }
}

impl PropValue for UserProperty {
    fn read(r: &mut Reader, _: u8) -> Result<Self, DecodeError> {
        Ok((r.string()?, r.string()?))
    }
    fn wire_len(&self) -> usize {
        binary_len(self.0.as_bytes()) + binary_len(self.1.as_bytes())
    }
    fn write(&self, out: &mut BytesMut) -> Result<(), EncodeError> {
        put_str(out, &self.0)?;
        put_str(out, &self.1)
    }
}

macro_rules! prop_field {
    (one $ty:ty) => { Option<$ty> };
    (many $ty:ty) => { Vec<$ty> };
}

macro_rules! prop_empty {
    (one) => {
        None
    };
    (many) => {
        Vec::new()
    };
}

macro_rules! prop_store {
    (one, $slot:expr, $value:expr, $id:expr) => {{
        if $slot.is_some() {
            return Err(DecodeError::DuplicateProperty($id));
        }
        $slot = Some($value);
    }};
    (many, $slot:expr, $value:expr, $id:expr) => {
        $slot.push($value)
    };
}

macro_rules! prop_len {
    (one, $slot:expr) => {
        $slot.as_ref().map_or(0, |v| 1 + PropValue::wire_len(v))
    };
    (many, $slot:expr) => {
        $slot
            .iter()
            .map(|v| 1 + PropValue::wire_len(v))
            .sum::<usize>()
    };
}

macro_rules! prop_write {
    (one, $slot:expr, $id:expr, $out:expr) => {
        if let Some(v) = &$slot {
            $out.put_u8($id);
            v.write($out)?;
        }
    };
    (many, $slot:expr, $id:expr, $out:expr) => {
        for v in &$slot {
            $out.put_u8($id);
            v.write($out)?;
        }
    };
}

macro_rules! properties {
    ($(#[$meta:meta])* $name:ident ($label:literal) {
        $($(#[$fdoc:meta])* $kind:ident $field:ident : $ty:ty = $id:path,)*
    }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Default, PartialEq, Eq)]
        pub struct $name {
            $($(#[$fdoc])* pub $field: prop_field!($kind $ty),)*
        }

        impl $name {
            /// Reads the property length and the properties it covers (5.0); 3.x packets
            /// carry none.
            pub(crate) fn read(r: &mut Reader, v: Protocol) -> Result<Props<Self>, DecodeError> {
                if !v.is_v5() {
                    return Ok(Props::NONE);
                }
                let len = r.varint()? as usize;
                if len == 0 {
                    return Ok(Props::NONE);
                }
                let mut r = Reader::new(r.take(len)?);
                let mut props = Self::default();
                while !r.is_empty() {
                    let raw = r.varint()?;
                    let id = u8::try_from(raw).map_err(|_| DecodeError::UnknownProperty(raw))?;
                    match id {
                        $($id => prop_store!($kind, props.$field, PropValue::read(&mut r, id)?, id),)*
                        _ if id::is_known(id) => {
                            return Err(DecodeError::PropertyNotAllowed { id, packet: $label })
                        }
                        _ => return Err(DecodeError::UnknownProperty(raw)),
                    }
                }
                Ok(Props(Some(Box::new(props))))
            }
        }

        impl PropertyList for $name {
            fn empty_ref() -> &'static Self {
                static EMPTY: $name = $name { $($field: prop_empty!($kind),)* };
                &EMPTY
            }

            fn list_len(&self) -> usize {
                0 $(+ prop_len!($kind, self.$field))*
            }

            fn write_list(&self, out: &mut BytesMut) -> Result<(), EncodeError> {
                $(prop_write!($kind, self.$field, $id, out);)*
                Ok(())
            }
        }
    };
}

properties! {
    /// CONNECT properties (3.1.2.11).
    ConnectProperties ("CONNECT") {
        /// Seconds the session outlives the connection; absent means 0.
        one session_expiry_interval: u32 = id::SESSION_EXPIRY_INTERVAL,
        /// Extended authentication method.
        one authentication_method: Str = id::AUTHENTICATION_METHOD,
        /// Extended authentication data.
        one authentication_data: Bytes = id::AUTHENTICATION_DATA,
        /// Whether the server may send Reason Strings and User Properties on failures.
        one request_problem_information: bool = id::REQUEST_PROBLEM_INFORMATION,
        /// Whether the server may send Response Information in CONNACK.
        one request_response_information: bool = id::REQUEST_RESPONSE_INFORMATION,
        /// QoS 1/2 messages the client will process at once; absent means 65,535.
        one receive_maximum: NonZeroU16 = id::RECEIVE_MAXIMUM,
        /// Highest topic alias the client accepts from the server; absent means 0.
        one topic_alias_maximum: u16 = id::TOPIC_ALIAS_MAXIMUM,
        /// User properties, in order.
        many user_properties: UserProperty = id::USER_PROPERTY,
        /// Largest packet the client accepts.
        one maximum_packet_size: NonZeroU32 = id::MAXIMUM_PACKET_SIZE,
    }
}

properties! {
    /// Will properties, in the CONNECT payload (3.1.3.2).
    WillProperties ("will properties") {
        /// Whether the will payload is UTF-8.
        one payload_format_indicator: PayloadFormat = id::PAYLOAD_FORMAT_INDICATOR,
        /// Lifetime of the will message in seconds.
        one message_expiry_interval: u32 = id::MESSAGE_EXPIRY_INTERVAL,
        /// MIME-like content type.
        one content_type: Str = id::CONTENT_TYPE,
        /// Topic for a response.
        one response_topic: TopicName = id::RESPONSE_TOPIC,
        /// Correlation data for a response.
        one correlation_data: Bytes = id::CORRELATION_DATA,
        /// Seconds to wait before publishing the will.
        one will_delay_interval: u32 = id::WILL_DELAY_INTERVAL,
        /// User properties, in order.
        many user_properties: UserProperty = id::USER_PROPERTY,
    }
}

properties! {
    /// CONNACK properties (3.2.2.3).
    ConnAckProperties ("CONNACK") {
        /// Session expiry the server uses, if different from the client's.
        one session_expiry_interval: u32 = id::SESSION_EXPIRY_INTERVAL,
        /// Client identifier the server assigned.
        one assigned_client_identifier: Str = id::ASSIGNED_CLIENT_IDENTIFIER,
        /// Keep alive the server imposes.
        one server_keep_alive: u16 = id::SERVER_KEEP_ALIVE,
        /// Extended authentication method.
        one authentication_method: Str = id::AUTHENTICATION_METHOD,
        /// Extended authentication data.
        one authentication_data: Bytes = id::AUTHENTICATION_DATA,
        /// Basis for response topics.
        one response_information: Str = id::RESPONSE_INFORMATION,
        /// Another server to use.
        one server_reference: Str = id::SERVER_REFERENCE,
        /// Human-readable diagnostic.
        one reason_string: Str = id::REASON_STRING,
        /// QoS 1/2 messages the server will process at once.
        one receive_maximum: NonZeroU16 = id::RECEIVE_MAXIMUM,
        /// Highest topic alias the server accepts.
        one topic_alias_maximum: u16 = id::TOPIC_ALIAS_MAXIMUM,
        /// Highest QoS the server supports (0 or 1; absent means 2).
        one maximum_qos: QoS = id::MAXIMUM_QOS,
        /// Whether the server supports retained messages.
        one retain_available: bool = id::RETAIN_AVAILABLE,
        /// User properties, in order.
        many user_properties: UserProperty = id::USER_PROPERTY,
        /// Largest packet the server accepts.
        one maximum_packet_size: NonZeroU32 = id::MAXIMUM_PACKET_SIZE,
        /// Whether wildcard subscriptions are supported.
        one wildcard_subscription_available: bool = id::WILDCARD_SUBSCRIPTION_AVAILABLE,
        /// Whether subscription identifiers are supported.
        one subscription_identifiers_available: bool = id::SUBSCRIPTION_IDENTIFIER_AVAILABLE,
        /// Whether shared subscriptions are supported.
        one shared_subscription_available: bool = id::SHARED_SUBSCRIPTION_AVAILABLE,
    }
}

properties! {
    /// PUBLISH properties (3.3.2.3).
    PublishProperties ("PUBLISH") {
        /// Whether the payload is UTF-8.
        one payload_format_indicator: PayloadFormat = id::PAYLOAD_FORMAT_INDICATOR,
        /// Lifetime of the message in seconds.
        one message_expiry_interval: u32 = id::MESSAGE_EXPIRY_INTERVAL,
        /// MIME-like content type.
        one content_type: Str = id::CONTENT_TYPE,
        /// Topic for a response.
        one response_topic: TopicName = id::RESPONSE_TOPIC,
        /// Correlation data for a response.
        one correlation_data: Bytes = id::CORRELATION_DATA,
        /// Identifiers of every matching subscription (server to client only).
        many subscription_identifiers: SubscriptionId = id::SUBSCRIPTION_IDENTIFIER,
        /// Topic alias standing for the topic name.
        one topic_alias: NonZeroU16 = id::TOPIC_ALIAS,
        /// User properties, in order.
        many user_properties: UserProperty = id::USER_PROPERTY,
    }
}

properties! {
    /// Properties of PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK and UNSUBACK.
    AckProperties ("an acknowledgement") {
        /// Human-readable diagnostic.
        one reason_string: Str = id::REASON_STRING,
        /// User properties, in order.
        many user_properties: UserProperty = id::USER_PROPERTY,
    }
}

properties! {
    /// SUBSCRIBE properties (3.8.2.1).
    SubscribeProperties ("SUBSCRIBE") {
        /// Identifier delivered with every message matching these subscriptions.
        one subscription_identifier: SubscriptionId = id::SUBSCRIPTION_IDENTIFIER,
        /// User properties, in order.
        many user_properties: UserProperty = id::USER_PROPERTY,
    }
}

properties! {
    /// UNSUBSCRIBE properties (3.10.2.1).
    UnsubscribeProperties ("UNSUBSCRIBE") {
        /// User properties, in order.
        many user_properties: UserProperty = id::USER_PROPERTY,
    }
}

properties! {
    /// DISCONNECT properties (3.14.2.2).
    DisconnectProperties ("DISCONNECT") {
        /// New session expiry (client to server only).
        one session_expiry_interval: u32 = id::SESSION_EXPIRY_INTERVAL,
        /// Another server to use.
        one server_reference: Str = id::SERVER_REFERENCE,
        /// Human-readable diagnostic.
        one reason_string: Str = id::REASON_STRING,
        /// User properties, in order.
        many user_properties: UserProperty = id::USER_PROPERTY,
    }
}

properties! {
    /// AUTH properties (3.15.2.2).
    AuthProperties ("AUTH") {
        /// Extended authentication method.
        one authentication_method: Str = id::AUTHENTICATION_METHOD,
        /// Extended authentication data.
        one authentication_data: Bytes = id::AUTHENTICATION_DATA,
        /// Human-readable diagnostic.
        one reason_string: Str = id::REASON_STRING,
        /// User properties, in order.
        many user_properties: UserProperty = id::USER_PROPERTY,
    }
}
