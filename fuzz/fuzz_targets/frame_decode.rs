//! The server's wire decoders on arbitrary bytes, as a connection would see them: the input
//! is split into frames (`split_frame`, bounded by `FRAME_SIZE_BYTES_MAX`); each frame is
//! read as a request header and body (`get_request_header`, `Request::decode`) and as a
//! response to every api key (`Response::decode`). Nothing may panic, and whatever decodes
//! must re-encode to a frame that decodes to the same value. The first two input bytes also
//! pick an api key (mod `api::COUNT + 1`) whose request body decoder gets the rest directly,
//! so every api key's body decoder is reached without a valid header.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use rill_server::frame::{get_request_header, split_frame, WireReader};
use rill_server::limits::FRAME_SIZE_BYTES_MAX;
use rill_server::messages::{api, Request, Response};

/// Splits `encoded` (one whole frame) back off and returns its body.
fn one_frame(encoded: Vec<Bytes>) -> Bytes {
    let mut buf = BytesMut::new();
    for part in encoded {
        buf.extend_from_slice(&part);
    }
    let frame = split_frame(&mut buf, FRAME_SIZE_BYTES_MAX).expect("an encoded frame is in bounds").expect("whole");
    assert!(buf.is_empty(), "an encoded frame is exactly one frame");
    frame
}

fn check_request_roundtrip(request: &Request, correlation_id: u32, client_id: &str) {
    let frame = one_frame(request.encode(correlation_id, client_id));
    let mut r = WireReader::new(frame);
    let header = get_request_header(&mut r).expect("an encoded header decodes");
    assert_eq!(header.api_key, request.api_key());
    assert_eq!(header.correlation_id, correlation_id);
    assert_eq!(header.client_id, client_id);
    let again = Request::decode(header.api_key, r).expect("an encoded request decodes");
    assert_eq!(&again, request, "request does not round-trip");
}

fn check_frame(frame: Bytes) {
    let mut r = WireReader::new(frame.clone());
    if let Ok(header) = get_request_header(&mut r) {
        if let Ok(request) = Request::decode(header.api_key, r) {
            check_request_roundtrip(&request, header.correlation_id, &header.client_id);
        }
    }
    for api_key in 0..=api::COUNT {
        if let Ok((correlation_id, Ok(response))) = Response::decode(api_key, frame.clone()) {
            let again = Response::decode(api_key, one_frame(response.encode(correlation_id)));
            match again {
                Ok((id, Ok(again))) => {
                    assert_eq!(id, correlation_id);
                    assert_eq!(again, response, "response to api key {api_key} does not round-trip");
                }
                other => panic!("re-encoded response to api key {api_key} does not decode: {other:?}"),
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // As a stream of frames.
    let mut buf = BytesMut::from(data);
    let mut frames = 0;
    while let Ok(Some(frame)) = split_frame(&mut buf, FRAME_SIZE_BYTES_MAX) {
        check_frame(frame);
        frames += 1;
        if frames > 64 {
            break;
        }
    }
    // As one body for a chosen api key.
    if data.len() >= 2 {
        let api_key = u16::from_le_bytes([data[0], data[1]]) % (api::COUNT + 1);
        let body = Bytes::copy_from_slice(&data[2..]);
        if let Ok(request) = Request::decode(api_key, WireReader::new(body)) {
            check_request_roundtrip(&request, 7, "fuzz");
        }
    }
});
