// Completes a PSK handshake with a DTLS server, sends one datagram, closes. Exit 0 on success.
const { dtls } = require("node-dtls-client");
const [host, port, identity, key] = process.argv.slice(2);
const psk = {}; psk[identity] = key;
const socket = dtls.createSocket({ type: "udp4", address: host, port: Number(port), psk, timeout: 5000,
    ciphers: ["TLS_PSK_WITH_AES_128_CCM_8"] })
  .on("connected", () => { console.log("connected"); socket.send(Buffer.from("hello from node-dtls-client"), () => socket.close()); })
  .on("error", (e) => { console.error("error: " + e); process.exit(1); })
  .on("close", () => { console.log("closed"); process.exit(0); });
setTimeout(() => { console.error("timeout"); process.exit(2); }, 10000);
