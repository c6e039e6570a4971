/// The Internet checksum (RFC 1071) and its incremental update (RFC 1624).
///
/// All values here are *raw*: 16/32-bit words loaded from packet memory in native byte order, the way the
/// bytes lie on the wire. The one's-complement sum is byte-order independent (RFC 1071 §2(B)), so a checksum
/// computed over native loads and stored back natively is the correct network-order checksum. Convert a
/// host-order value `v` to its raw form with `v.bigEndian` before mixing it into a sum.
public enum InternetChecksum {
    /// Adds `count` bytes at `base` to a running (unfolded) one's-complement sum.
    @inlinable
    public static func accumulate(_ base: UnsafeRawPointer, count: Int, into initial: UInt64 = 0) -> UInt64 {
        var sum = initial
        var offset = 0
        // 32-bit words into a 64-bit accumulator: cannot overflow for anything below 2^32 words.
        let words = count / 4
        var i = 0
        while i < words {
            sum &+= UInt64(base.loadUnaligned(fromByteOffset: offset, as: UInt32.self))
            offset &+= 4
            i &+= 1
        }
        if count - offset >= 2 {
            sum &+= UInt64(base.loadUnaligned(fromByteOffset: offset, as: UInt16.self))
            offset &+= 2
        }
        if offset < count {
            // A trailing odd byte is the high-order byte of a zero-padded 16-bit word in network order.
            let byte = base.load(fromByteOffset: offset, as: UInt8.self)
            sum &+= UInt64(UInt16(bigEndian: UInt16(byte) << 8))
        }
        return sum
    }

    /// Folds a running sum to 16 bits (end-around carry).
    @inlinable
    public static func fold(_ sum: UInt64) -> UInt16 {
        var s = sum
        while s >> 16 != 0 { s = (s & 0xffff) &+ (s >> 16) }
        return UInt16(truncatingIfNeeded: s)
    }

    /// The checksum (complemented folded sum) of a buffer, raw.
    @inlinable
    public static func checksum(_ base: UnsafeRawPointer, count: Int, initial: UInt64 = 0) -> UInt16 {
        ~fold(accumulate(base, count: count, into: initial))
    }

    /// RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m'), for one changed 16-bit word (all raw).
    @inlinable
    public static func update(_ checksum: UInt16, old: UInt16, new: UInt16) -> UInt16 {
        let sum = UInt64(~checksum) &+ UInt64(~old) &+ UInt64(new)
        return ~fold(sum)
    }

    /// RFC 1624 for a changed 32-bit field (an IPv4 address), raw.
    @inlinable
    public static func update(_ checksum: UInt16, old: UInt32, new: UInt32) -> UInt16 {
        let sum = UInt64(~checksum)
            &+ UInt64(~UInt16(truncatingIfNeeded: old >> 16)) &+ UInt64(~UInt16(truncatingIfNeeded: old))
            &+ UInt64(UInt16(truncatingIfNeeded: new >> 16)) &+ UInt64(UInt16(truncatingIfNeeded: new))
        return ~fold(sum)
    }

    /// The unfolded sum of the TCP/UDP IPv4 pseudo-header (addresses raw, protocol and length host order).
    @inlinable
    public static func pseudoHeaderSum(sourceRaw: UInt32, destinationRaw: UInt32, protocolNumber: UInt8,
                                       length: Int) -> UInt64 {
        UInt64(sourceRaw) &+ UInt64(destinationRaw)
            &+ UInt64((UInt32(protocolNumber) << 16 | UInt32(truncatingIfNeeded: length)).bigEndian)
    }
}
