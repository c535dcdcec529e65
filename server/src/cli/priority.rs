//! `rill consume-priority`: one poll of a priority cursor, printed and then acked or nacked.

use std::io::Write as _;

use crate::client::Client;
use crate::error::{Error, Result};
use crate::messages::{PriorityCursorSettings, PriorityDelivery};

use super::ConsumePriorityArgs;

/// Reason recorded when `--nack` gives messages back.
const NACK_REASON: &str = "nacked by rill consume-priority";

pub(super) async fn consume(client: &Client, args: ConsumePriorityArgs) -> Result<()> {
    let settings = PriorityCursorSettings::default();
    let deliveries = client.priority_poll(&args.topic, &args.cursor, args.max, settings).await?;
    let mut out = String::new();
    for d in &deliveries {
        out.push_str(&line(d));
        out.push('\n');
    }
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(out.as_bytes()).and_then(|()| stdout.flush()).map_err(|e| Error::io("write output", e))?;
    drop(stdout);
    for d in &deliveries {
        if args.nack {
            client.priority_nack(&args.topic, &args.cursor, d.lease, None, NACK_REASON).await?;
        } else {
            client.priority_ack(&args.topic, &args.cursor, d.lease).await?;
        }
    }
    Ok(())
}

/// `lane<TAB>offset<TAB>value` (the value as lossy UTF-8; `null` when absent).
fn line(d: &PriorityDelivery) -> String {
    let value = d.value.as_deref().map_or_else(|| "null".to_string(), |v| String::from_utf8_lossy(v).into_owned());
    format!("{}\t{}\t{}", d.lease.lane, d.lease.offset, value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::LeaseRef;
    use bytes::Bytes;

    /// A delivery prints as lane, offset and value separated by tabs.
    #[test]
    fn delivery_line() {
        let d = PriorityDelivery {
            lease: LeaseRef { lane: 2, partition: 0, offset: 7, lease_id: 1 },
            delivery_count: 1,
            lease_deadline_ms: 0,
            timestamp_ms: 0,
            key: None,
            value: Some(Bytes::from_static(b"hello")),
            headers: Vec::new(),
        };
        assert_eq!(line(&d), "2\t7\thello");
        assert_eq!(line(&PriorityDelivery { value: None, ..d }), "2\t7\tnull");
    }
}
