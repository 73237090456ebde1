// Command centrifuge-bench is the Centrifugo-design peer of `make bench`: the centrifuge library
// (Centrifugo's engine) behind a minimal server. Clients connect over WebSocket with the
// centrifuge JSON protocol and authenticate with an HS256 JWT in the connect command, as
// Centrifugo clients do; any authenticated client may subscribe to any channel. Every NATS
// message on `-subject` is published with node.Publish to the channel named like its subject.
package main

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"flag"
	"log"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/centrifugal/centrifuge"
	"github.com/nats-io/nats.go"
)

type claims struct {
	Sub string `json:"sub"`
	Exp int64  `json:"exp"`
}

// verify checks an HS256 JWT's signature and expiry and returns its subject.
func verify(token string, key []byte) (string, bool) {
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return "", false
	}
	var hdr struct {
		Alg string `json:"alg"`
	}
	h, err := base64.RawURLEncoding.DecodeString(parts[0])
	if err != nil || json.Unmarshal(h, &hdr) != nil || hdr.Alg != "HS256" {
		return "", false
	}
	sig, err := base64.RawURLEncoding.DecodeString(parts[2])
	if err != nil {
		return "", false
	}
	mac := hmac.New(sha256.New, key)
	mac.Write([]byte(parts[0] + "." + parts[1]))
	if !hmac.Equal(sig, mac.Sum(nil)) {
		return "", false
	}
	p, err := base64.RawURLEncoding.DecodeString(parts[1])
	var c claims
	if err != nil || json.Unmarshal(p, &c) != nil || c.Sub == "" || c.Exp < time.Now().Unix() {
		return "", false
	}
	return c.Sub, true
}

func main() {
	listen := flag.String("listen", "127.0.0.1:8000", "WebSocket listen address (path /connection/websocket)")
	natsURL := flag.String("nats", "nats://127.0.0.1:4222", "NATS URL")
	natsToken := flag.String("nats-token", "", "NATS auth token")
	subject := flag.String("subject", "bench.>", "NATS subject fed into channels")
	keyFile := flag.String("hmac-secret-file", "", "HS256 key file")
	flag.Parse()

	key, err := os.ReadFile(*keyFile)
	if err != nil {
		log.Fatalf("key: %v", err)
	}
	node, err := centrifuge.New(centrifuge.Config{LogLevel: centrifuge.LogLevelError,
		LogHandler: func(e centrifuge.LogEntry) { log.Printf("%s %v", e.Message, e.Fields) }})
	if err != nil {
		log.Fatal(err)
	}
	node.OnConnecting(func(ctx context.Context, e centrifuge.ConnectEvent) (centrifuge.ConnectReply, error) {
		sub, ok := verify(e.Token, key)
		if !ok {
			return centrifuge.ConnectReply{}, centrifuge.DisconnectInvalidToken
		}
		return centrifuge.ConnectReply{Credentials: &centrifuge.Credentials{UserID: sub}}, nil
	})
	node.OnConnect(func(client *centrifuge.Client) {
		client.OnSubscribe(func(e centrifuge.SubscribeEvent, cb centrifuge.SubscribeCallback) {
			cb(centrifuge.SubscribeReply{}, nil)
		})
	})
	if err := node.Run(); err != nil {
		log.Fatal(err)
	}

	nc, err := nats.Connect(*natsURL, nats.Token(*natsToken), nats.MaxReconnects(-1))
	if err != nil {
		log.Fatalf("nats: %v", err)
	}
	sub, err := nc.Subscribe(*subject, func(m *nats.Msg) {
		if _, err := node.Publish(m.Subject, m.Data); err != nil {
			log.Printf("publish: %v", err)
		}
	})
	if err != nil {
		log.Fatal(err)
	}
	_ = sub.SetPendingLimits(-1, -1)
	if err := nc.Flush(); err != nil {
		log.Fatal(err)
	}

	mux := http.NewServeMux()
	mux.Handle("/connection/websocket", centrifuge.NewWebsocketHandler(node, centrifuge.WebsocketConfig{
		ReadBufferSize:  1024,
		WriteBufferSize: 1024,
		CheckOrigin:     func(*http.Request) bool { return true },
	}))
	srv := &http.Server{Addr: *listen, Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := srv.ListenAndServe(); err != nil && err != http.ErrServerClosed {
			log.Fatal(err)
		}
	}()
	log.Printf("listening on %s", *listen)
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = node.Shutdown(ctx)
	nc.Close()
}
