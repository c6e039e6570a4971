import DyscoCore
import Testing

@Suite("Dysco SYN trailer codec (paper §2.1: session 5-tuple and address list in the SYN payload)")
struct DyscoSynPayloadTests {
    let session = FiveTuple.t("10.77.0.10", 43210, "10.77.0.201", 80)

    func decode(_ bytes: [UInt8]) throws(DyscoSynPayload.DecodeError) -> (DyscoSynPayload, Int) {
        let result = bytes.withUnsafeBytes { raw in
            Result { () throws(DyscoSynPayload.DecodeError) in try DyscoSynPayload.decode(trailerOf: raw) }
        }
        return try result.get()
    }

    @Test("round trip with 0, 1 and 16 addresses, after arbitrary leading payload (TFO data)", arguments: [0, 1, 16])
    func roundTrip(count: Int) throws {
        let hops = (0..<count).map { IPv4Address(10, 77, 0, UInt8(100 + $0)) }
        let payload = DyscoSynPayload(session: session, remaining: hops)
        let encoded = payload.encoded()
        #expect(encoded.count == 22 + 4 * count)
        let leading: [UInt8] = [9, 8, 7]
        let (decoded, length) = try decode(leading + encoded)
        #expect(decoded == payload)
        #expect(length == encoded.count)
        #expect((leading + encoded).withUnsafeBytes { DyscoSynPayload.hasTrailer($0) })
    }

    @Test("no magic means not a Dysco SYN")
    func noMagic() {
        var bytes = DyscoSynPayload(session: session, remaining: []).encoded()
        bytes[bytes.count - 1] ^= 0xff
        #expect(!bytes.withUnsafeBytes { DyscoSynPayload.hasTrailer($0) })
        #expect(![UInt8]().withUnsafeBytes { DyscoSynPayload.hasTrailer($0) })
    }

    @Test("every malformed trailer is reported, never trusted")
    func malformed() {
        let good = DyscoSynPayload(session: session, remaining: [IPv4Address(10, 77, 0, 101)]).encoded()
        func mutated(_ body: (inout [UInt8]) -> Void) -> [UInt8] {
            var copy = good
            body(&copy)
            return copy
        }
        let n = good.count
        #expect(throws: DyscoSynPayload.DecodeError.tooShort(available: 10)) { try decode(Array(good.suffix(10))) }
        #expect(throws: DyscoSynPayload.DecodeError.unsupportedVersion(2)) { try decode(mutated { $0[0] = 2 }) }
        #expect(throws: DyscoSynPayload.DecodeError.unsupportedFamily(6)) { try decode(mutated { $0[1] = 6 }) }
        #expect(throws: DyscoSynPayload.DecodeError.badLength(declared: 26, addresses: 2)) { try decode(mutated { $0[2] = 2 }) }
        #expect(throws: DyscoSynPayload.DecodeError.reservedNotZero) { try decode(mutated { $0[3] = 1 }) }
        #expect(throws: DyscoSynPayload.DecodeError.zeroAddress) { try decode(mutated { $0[4...7] = [0, 0, 0, 0] }) }
        #expect(throws: DyscoSynPayload.DecodeError.zeroAddress) { try decode(mutated { $0[16...19] = [0, 0, 0, 0] }) }
        // Declared length longer than the payload, or not 22 + 4n.
        #expect(throws: DyscoSynPayload.DecodeError.self) { try decode(mutated { $0[n - 6] = 1; $0[n - 5] = 0 }) }
        #expect(throws: DyscoSynPayload.DecodeError.self) { try decode(mutated { $0[n - 5] = 27 }) }
        // Too many addresses.
        let many = DyscoSynPayload(session: session, remaining: Array(repeating: IPv4Address(10, 0, 0, 1), count: 16)).encoded()
        var tooMany = many
        tooMany[2] = 17
        #expect(throws: DyscoSynPayload.DecodeError.self) { try decode(tooMany) }
    }

    @Test("random trailers never crash the decoder")
    func fuzz() {
        var rng = SplitMix64(state: 6)
        let magic: [UInt8] = [0x44, 0x59, 0x53, 0x43]
        for _ in 0..<20000 {
            var bytes = (0..<Int.random(in: 0...120, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
            bytes += magic
            if let (decoded, length) = try? decode(bytes) {
                #expect(length <= bytes.count)
                #expect(decoded.remaining.count <= DyscoSynPayload.maxAddresses)
            }
        }
    }
}
