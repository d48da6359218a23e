//! The IM cluster's shared protocol: everything the Route and the IM
//! server must agree on, so that neither application imports the other.
//!
//! - [`link`]: the frames of the IM server ↔ Route link, as serde-tagged
//!   enums (`method`) with an `Unknown` variant.
//! - [`user`]: the frames of the user ↔ IM server link.
//! - [`error`]: the error frame `{"error":{"code","message"}}` and its codes.
//! - [`keys`]: the Redis key schema (every key and channel name).
//! - [`ids`]: uid and serviceName validation.
//! - [`inbox`]: every user's stored messages (ids, seq, epochs, acks).
//! - [`audit`]: accepted messages verified after a Redis failover (a loss
//!   starts a new epoch: `resync`, never silence).
//! - [`groups`]: group membership, group streams (`gseq`), per-server counts.
//! - [`servers`]: the registry's record format ([`servers::ServerEntry`],
//!   the seed's set member) and its reads.
//! - [`presence`]: who is online where (written by IM servers, read by the
//!   Route).
//! - [`admin`]: which HTTP paths the admin address keeps, for both apps.

pub mod admin;
pub mod audit;
pub mod error;
pub mod groups;
pub mod ids;
pub mod inbox;
pub mod keys;
pub mod link;
pub mod presence;
pub mod servers;
pub mod user;

pub use error::{ErrorCode, ProtocolError};
pub use ids::{valid_service_name, valid_uid};
pub use keys::Keys;

/// Serialises a frame type to its JSON text. The frame types hold only
/// strings, numbers and `serde_json::Value`s, whose serialisation cannot
/// fail; should it ever, the failure is logged and the frame is empty.
pub(crate) fn encode<T: serde::Serialize>(frame: &T) -> String {
    serde_json::to_string(frame).unwrap_or_else(|e| {
        log::error!("cluster: cannot serialise a frame: {e}");
        String::new()
    })
}
