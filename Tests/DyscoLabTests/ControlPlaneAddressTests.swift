@testable import DyscoAgent
import DyscoCore
import Glibc
import Testing

/// The control plane reads a datagram's addresses from its sockaddr_in (no text round trip).
@Suite struct ControlPlaneAddressTests {
    func sockaddr(_ text: String, family: Int32 = AF_INET) -> sockaddr_in {
        var address = sockaddr_in()
        address.sin_family = sa_family_t(family)
        address.sin_port = UInt16(4242).bigEndian
        _ = inet_pton(AF_INET, text, &address.sin_addr)
        return address
    }

    @Test func readsTheAddressInNetworkOrder() {
        for text in ["10.79.92.3", "0.0.0.0", "255.255.255.255", "192.168.1.200"] {
            #expect(IPAddress(sockaddrIn: sockaddr(text)) == IPAddress(text), "\(text)")
        }
        #expect(IPAddress(sockaddrIn: sockaddr("10.1.2.3"))?.description == "10.1.2.3")
    }

    @Test func refusesAnotherFamily() {
        #expect(IPAddress(sockaddrIn: sockaddr("10.1.2.3", family: AF_INET6)) == nil)
    }
}
