//! What the hub writes to an agent's session: a `HubMessage` on the wire,
//! with updates encoded once per revision and shared by every session.
//!
//! An embedded message and a `bytes` field are the same on the wire (a key,
//! a length, the bytes), so an update already encoded as a `UnitUpdate`
//! is written as field 2 of `HubMessage` without decoding or copying it:
//! agents read an ordinary `HubMessage`. The hub serves the session with
//! [`crate::session`], whose stream carries this type.

use bytes::{Buf, BufMut, Bytes};
use prost::encoding::{DecodeContext, WireType};

use crate::v1;

/// `HubMessage.update`'s field number.
const UPDATE_FIELD: u32 = 2;

/// One message of the hub's session stream.
#[derive(Clone, Debug, PartialEq)]
pub enum Outgoing {
    /// A message encoded as it is sent.
    Message(v1::HubMessage),
    /// An update, already encoded (a `UnitUpdate`, see [`encode_update`]).
    Update(Bytes),
}

impl Default for Outgoing {
    fn default() -> Self {
        Outgoing::Message(v1::HubMessage::default())
    }
}

impl From<v1::HubMessage> for Outgoing {
    fn from(m: v1::HubMessage) -> Self {
        Outgoing::Message(m)
    }
}

/// Encodes an update once, for [`Outgoing::Update`].
pub fn encode_update(update: &v1::UnitUpdate) -> Bytes {
    Bytes::from(prost::Message::encode_to_vec(update))
}

impl prost::Message for Outgoing {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        match self {
            Outgoing::Message(m) => m.encode_raw(buf),
            Outgoing::Update(b) => {
                prost::encoding::encode_key(UPDATE_FIELD, WireType::LengthDelimited, buf);
                prost::encoding::encode_varint(b.len() as u64, buf);
                buf.put_slice(b);
            }
        }
    }

    /// Read back, it is the plain `HubMessage` it stands for.
    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        if let Outgoing::Update(b) = self {
            let update = <v1::UnitUpdate as prost::Message>::decode(b.clone())?;
            *self = Outgoing::Message(v1::HubMessage {
                msg: Some(v1::hub_message::Msg::Update(update)),
            });
        }
        match self {
            Outgoing::Message(m) => m.merge_field(tag, wire_type, buf, ctx),
            Outgoing::Update(_) => unreachable!("made a message above"),
        }
    }

    fn encoded_len(&self) -> usize {
        match self {
            Outgoing::Message(m) => m.encoded_len(),
            Outgoing::Update(b) => {
                prost::encoding::key_len(UPDATE_FIELD)
                    + prost::encoding::encoded_len_varint(b.len() as u64)
                    + b.len()
            }
        }
    }

    fn clear(&mut self) {
        *self = Outgoing::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn update() -> v1::UnitUpdate {
        v1::UnitUpdate {
            unit: "web".into(),
            revision: 7,
            digest: "ab".repeat(32),
            tombstone: false,
            manifests: "apiVersion: v1\nkind: ConfigMap\n".repeat(500),
            environment: "dev".into(),
            committed_at: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 5,
            }),
        }
    }

    #[test]
    fn a_pre_encoded_update_is_the_hub_message_byte_for_byte() {
        let u = update();
        let direct = v1::HubMessage {
            msg: Some(v1::hub_message::Msg::Update(u.clone())),
        };
        let shared = Outgoing::Update(encode_update(&u));
        assert_eq!(shared.encoded_len(), direct.encoded_len());
        assert_eq!(shared.encode_to_vec(), direct.encode_to_vec());
        let read = v1::HubMessage::decode(&*shared.encode_to_vec()).unwrap();
        assert_eq!(read, direct);
        let back = Outgoing::decode(&*shared.encode_to_vec()).unwrap();
        assert_eq!(back, Outgoing::Message(direct));
    }

    #[test]
    fn other_messages_are_encoded_as_they_are() {
        let m = v1::HubMessage {
            msg: Some(v1::hub_message::Msg::Heartbeat(v1::Heartbeat::default())),
        };
        let out = Outgoing::from(m.clone());
        assert_eq!(out.encode_to_vec(), m.encode_to_vec());
        assert_eq!(Outgoing::decode(&*m.encode_to_vec()).unwrap(), out);
    }

    #[test]
    fn merging_into_a_pre_encoded_update_is_merging_into_the_message() {
        let u = update();
        let more = v1::HubMessage {
            msg: Some(v1::hub_message::Msg::Update(v1::UnitUpdate {
                revision: 8,
                ..Default::default()
            })),
        }
        .encode_to_vec();
        let mut direct = v1::HubMessage {
            msg: Some(v1::hub_message::Msg::Update(u.clone())),
        };
        direct.merge(&*more).unwrap();
        let mut shared = Outgoing::Update(encode_update(&u));
        shared.merge(&*more).unwrap();
        assert_eq!(shared, Outgoing::Message(direct));
    }
}
