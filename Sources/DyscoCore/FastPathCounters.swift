import Foundation

/// Reads per-session packet counters out of `nft -j list table` output.
public enum FastPathCounters {
    public static func packetsBySession(json: Data) -> [SessionTable.SessionID: UInt64] {
        guard let root = try? JSONSerialization.jsonObject(with: json) as? [String: Any],
              let objects = root["nftables"] as? [[String: Any]] else { return [:] }
        var totals: [SessionTable.SessionID: UInt64] = [:]
        for object in objects {
            guard let rule = object["rule"] as? [String: Any], let chain = rule["chain"] as? String,
                  let id = FastPathScript.session(ofChain: chain), let exprs = rule["expr"] as? [[String: Any]] else {
                continue
            }
            for expr in exprs {
                if let counter = expr["counter"] as? [String: Any], let packets = counter["packets"] as? NSNumber {
                    totals[id, default: 0] += packets.uint64Value
                }
            }
        }
        return totals
    }
}
