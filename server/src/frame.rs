//! Wire framing and primitive encodings of protocol v1 (normative: `docs/protocol.md`).
//! Pure: no sockets here.
//!
//! A frame is a `u32` little-endian length followed by that many bytes. A request frame
//! starts with the request header, a response frame with the response header.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::{Error, ErrorCode, Result};
use crate::limits::{FRAME_SIZE_BYTES_MAX, STRING_LEN_MAX};

/// Size of the length prefix.
pub const LENGTH_PREFIX_SIZE: usize = 4;
/// Request header: api key (u16), api version (u16), correlation id (u32), then the
/// client id string.
pub const REQUEST_HEADER_FIXED_SIZE: usize = 2 + 2 + 4;
/// Response header: correlation id (u32), error code (u16).
pub const RESPONSE_HEADER_SIZE: usize = 4 + 2;

/// Most bytes reserved at once for a frame that is still arriving.
const FRAME_RESERVE_STEP_BYTES: usize = 1024 * 1024;

/// The header of a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    /// Which operation.
    pub api_key: u16,
    /// Version of the operation's body layout.
    pub api_version: u16,
    /// Chosen by the client; echoed in the response.
    pub correlation_id: u32,
    /// Free-form client name, for logs and metrics.
    pub client_id: String,
}

/// Splits one complete frame off the front of `buf`, if it holds one. Errors when the
/// length prefix announces a frame over `max_frame_bytes` (before anything is allocated).
pub fn split_frame(buf: &mut BytesMut, max_frame_bytes: u32) -> Result<Option<Bytes>> {
    if buf.len() < LENGTH_PREFIX_SIZE {
        return Ok(None);
    }
    let len = u32::from_le_bytes(buf[..LENGTH_PREFIX_SIZE].try_into().expect("4 bytes"));
    if len > max_frame_bytes.min(FRAME_SIZE_BYTES_MAX) {
        return Err(Error::FrameTooLarge { len, max: max_frame_bytes });
    }
    let total = LENGTH_PREFIX_SIZE + len as usize;
    if buf.len() < total {
        // Grow towards the frame as its bytes arrive, not all at once on the word of a
        // length prefix: an idle peer must not make the server reserve 16 MiB.
        buf.reserve((total - buf.len()).min(FRAME_RESERVE_STEP_BYTES));
        return Ok(None);
    }
    buf.advance(LENGTH_PREFIX_SIZE);
    Ok(Some(buf.split_to(len as usize).freeze()))
}

/// Reads typed fields from a frame; every read checks the remaining length.
#[derive(Debug)]
pub struct WireReader {
    buf: Bytes,
}

impl WireReader {
    /// Reads from `buf`.
    pub fn new(buf: Bytes) -> Self {
        WireReader { buf }
    }

    fn need(&self, n: usize, what: &'static str) -> Result<()> {
        if self.buf.remaining() < n {
            return Err(Error::malformed(format!("truncated {what}: need {n} bytes, have {}", self.buf.remaining())));
        }
        Ok(())
    }

    /// A `u8`.
    pub fn u8(&mut self, what: &'static str) -> Result<u8> {
        self.need(1, what)?;
        Ok(self.buf.get_u8())
    }
    /// A `u16`.
    pub fn u16(&mut self, what: &'static str) -> Result<u16> {
        self.need(2, what)?;
        Ok(self.buf.get_u16_le())
    }
    /// A `u32`.
    pub fn u32(&mut self, what: &'static str) -> Result<u32> {
        self.need(4, what)?;
        Ok(self.buf.get_u32_le())
    }
    /// A `u64`.
    pub fn u64(&mut self, what: &'static str) -> Result<u64> {
        self.need(8, what)?;
        Ok(self.buf.get_u64_le())
    }
    /// An `i16`.
    pub fn i16(&mut self, what: &'static str) -> Result<i16> {
        self.need(2, what)?;
        Ok(self.buf.get_i16_le())
    }
    /// An `i64`.
    pub fn i64(&mut self, what: &'static str) -> Result<i64> {
        self.need(8, what)?;
        Ok(self.buf.get_i64_le())
    }
    /// A boolean byte (0 or 1).
    pub fn bool(&mut self, what: &'static str) -> Result<bool> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(Error::malformed(format!("{what}: {other} is not a boolean"))),
        }
    }
    /// An optional `u64`: presence byte, then the value if present.
    pub fn opt_u64(&mut self, what: &'static str) -> Result<Option<u64>> {
        if self.bool(what)? {
            Ok(Some(self.u64(what)?))
        } else {
            Ok(None)
        }
    }
    /// A string: `u16` length, UTF-8 bytes.
    pub fn string(&mut self, what: &'static str) -> Result<String> {
        let len = usize::from(self.u16(what)?);
        if len > STRING_LEN_MAX {
            return Err(Error::malformed(format!("{what}: string of {len} bytes over {STRING_LEN_MAX}")));
        }
        self.need(len, what)?;
        let bytes = self.buf.split_to(len);
        String::from_utf8(bytes.to_vec()).map_err(|_utf8| Error::malformed(format!("{what} is not UTF-8")))
    }
    /// An optional string: presence byte, then the string.
    pub fn opt_string(&mut self, what: &'static str) -> Result<Option<String>> {
        if self.bool(what)? {
            Ok(Some(self.string(what)?))
        } else {
            Ok(None)
        }
    }
    /// A byte string: `u32` length, bytes (zero-copy).
    pub fn bytes(&mut self, what: &'static str) -> Result<Bytes> {
        let len = self.u32(what)? as usize;
        self.need(len, what)?;
        Ok(self.buf.split_to(len))
    }
    /// A length-prefixed byte string that may sit anywhere in a message: `u32` length, bytes.
    pub fn blob(&mut self, what: &'static str) -> Result<Bytes> {
        self.bytes(what)
    }
    /// An optional blob: presence byte, then the blob if present.
    pub fn opt_blob(&mut self, what: &'static str) -> Result<Option<Bytes>> {
        if self.bool(what)? {
            Ok(Some(self.blob(what)?))
        } else {
            Ok(None)
        }
    }
    /// Fails unless every byte was consumed.
    pub fn finish(self, what: &'static str) -> Result<()> {
        if self.buf.has_remaining() {
            return Err(Error::malformed(format!("{} trailing bytes after {what}", self.buf.remaining())));
        }
        Ok(())
    }
    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.remaining()
    }
}

/// Builds a frame: reserves the length prefix, collects fields, and can attach large
/// payloads as separate chunks so they are written without copying.
#[derive(Debug)]
pub struct WireWriter {
    head: BytesMut,
    chunks: Vec<Bytes>,
}

impl Default for WireWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl WireWriter {
    /// Starts a frame (the length is filled in by [`WireWriter::finish`]).
    pub fn new() -> Self {
        let mut head = BytesMut::with_capacity(64);
        head.put_u32_le(0);
        WireWriter { head, chunks: Vec::new() }
    }

    fn tail(&mut self) -> &mut BytesMut {
        debug_assert!(self.chunks.is_empty(), "a payload chunk ends its message: no field follows it");
        &mut self.head
    }

    /// A `u8`.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.tail().put_u8(v);
        self
    }
    /// A `u16`.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.tail().put_u16_le(v);
        self
    }
    /// A `u32`.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.tail().put_u32_le(v);
        self
    }
    /// A `u64`.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.tail().put_u64_le(v);
        self
    }
    /// An `i16`.
    pub fn i16(&mut self, v: i16) -> &mut Self {
        self.tail().put_i16_le(v);
        self
    }
    /// An `i64`.
    pub fn i64(&mut self, v: i64) -> &mut Self {
        self.tail().put_i64_le(v);
        self
    }
    /// A boolean byte.
    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.u8(u8::from(v))
    }
    /// An optional `u64`.
    pub fn opt_u64(&mut self, v: Option<u64>) -> &mut Self {
        match v {
            None => self.bool(false),
            Some(v) => self.bool(true).u64(v),
        }
    }
    /// A string (truncated to the protocol's maximum is a caller bug: asserted).
    pub fn string(&mut self, v: &str) -> &mut Self {
        let len = u16::try_from(v.len()).expect("strings are validated below STRING_LEN_MAX before encoding");
        debug_assert!(v.len() <= STRING_LEN_MAX, "string over STRING_LEN_MAX");
        self.tail().put_u16_le(len);
        self.tail().put_slice(v.as_bytes());
        self
    }
    /// An optional string.
    pub fn opt_string(&mut self, v: Option<&str>) -> &mut Self {
        match v {
            None => self.bool(false),
            Some(v) => self.bool(true).string(v),
        }
    }
    /// A length-prefixed byte string (`u32` length, bytes) that may sit anywhere in a
    /// message: always copied into the frame's buffer, unlike [`WireWriter::bytes`].
    pub fn blob(&mut self, v: &[u8]) -> &mut Self {
        let len = u32::try_from(v.len()).expect("payloads are bounded by FRAME_SIZE_BYTES_MAX");
        self.tail().put_u32_le(len);
        self.tail().put_slice(v);
        self
    }
    /// An optional blob: presence byte, then the blob if present.
    pub fn opt_blob(&mut self, v: Option<&[u8]>) -> &mut Self {
        match v {
            None => self.bool(false),
            Some(v) => self.bool(true).blob(v),
        }
    }
    /// A byte string; must be the last field of the message. Large payloads are kept as a
    /// separate chunk (no copy).
    pub fn bytes(&mut self, v: Bytes) -> &mut Self {
        let len = u32::try_from(v.len()).expect("payloads are bounded by FRAME_SIZE_BYTES_MAX");
        self.tail().put_u32_le(len);
        if v.len() < 4096 {
            self.head.put_slice(&v);
        } else {
            self.chunks.push(v);
        }
        self
    }

    /// Completes the frame: fills in the length; returns the chunks to write in order.
    pub fn finish(mut self) -> Vec<Bytes> {
        let chunks_len: usize = self.chunks.iter().map(Bytes::len).sum();
        let len = self.head.len() - LENGTH_PREFIX_SIZE + chunks_len;
        let len = u32::try_from(len).expect("frames are bounded by FRAME_SIZE_BYTES_MAX");
        self.head[..LENGTH_PREFIX_SIZE].copy_from_slice(&len.to_le_bytes());
        let mut out = Vec::with_capacity(1 + self.chunks.len());
        out.push(self.head.freeze());
        out.extend(self.chunks.into_iter().filter(|c| !c.is_empty()));
        out
    }
}

/// Encodes a request header.
pub fn put_request_header(w: &mut WireWriter, header: &RequestHeader) {
    w.u16(header.api_key).u16(header.api_version).u32(header.correlation_id).string(&header.client_id);
}

/// Decodes a request header from the front of a frame.
pub fn get_request_header(r: &mut WireReader) -> Result<RequestHeader> {
    Ok(RequestHeader {
        api_key: r.u16("api key")?,
        api_version: r.u16("api version")?,
        correlation_id: r.u32("correlation id")?,
        client_id: r.string("client id")?,
    })
}

/// Encodes a response header.
pub fn put_response_header(w: &mut WireWriter, correlation_id: u32, code: ErrorCode) {
    w.u32(correlation_id).u16(code as u16);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame split at every byte is reassembled only when complete; an oversize length is
    /// rejected before its body arrives.
    #[test]
    fn split_frame_reassembles_and_bounds() {
        let mut w = WireWriter::new();
        w.u16(7).string("hello").bytes(Bytes::from(vec![9u8; 5000]));
        let wire: Vec<u8> = w.finish().iter().flat_map(|c| c.to_vec()).collect();
        for cut in 0..wire.len() {
            let mut buf = BytesMut::from(&wire[..cut]);
            assert!(split_frame(&mut buf, FRAME_SIZE_BYTES_MAX).expect("no error").is_none(), "cut {cut}");
        }
        let mut buf = BytesMut::from(&wire[..]);
        let frame = split_frame(&mut buf, FRAME_SIZE_BYTES_MAX).expect("ok").expect("complete");
        let mut r = WireReader::new(frame);
        assert_eq!(r.u16("a").expect("u16"), 7);
        assert_eq!(r.string("s").expect("string"), "hello");
        assert_eq!(r.bytes("b").expect("bytes").len(), 5000);
        r.finish("test").expect("consumed");
        let mut huge = BytesMut::from(&(FRAME_SIZE_BYTES_MAX + 1).to_le_bytes()[..]);
        assert!(split_frame(&mut huge, FRAME_SIZE_BYTES_MAX).is_err());
    }
}
