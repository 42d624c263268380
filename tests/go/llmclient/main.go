// llmclient is the Go test client of the observer's Go tests: a plain net/http client (HTTP/2 by
// default over crypto/tls; GODEBUG=http2client=0 for HTTP/1.1) calling an OpenAI-style chat
// completions endpoint. The CA comes from SSL_CERT_FILE. Standard library only.
package main

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	neturl "net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

func main() {
	url := flag.String("url", "", "chat completions URL")
	tenant := flag.String("tenant", "t-go", "X-Tenant-ID header")
	n := flag.Int("n", 1, "calls to make (after the first, run -concurrency at a time)")
	conc := flag.Int("concurrency", 1, "goroutines calling at once after the first call")
	stream := flag.Bool("stream", false, "stream the completion (SSE, include_usage)")
	waitFile := flag.String("wait", "", "print 'waiting', then wait until this file exists before calling")
	until := flag.String("until", "", "call in a loop with -concurrency goroutines until this file exists")
	delay := flag.Duration("delay", 0, "sleep this long before the first call")
	warm := flag.Int("warm", 0, "calls made (tenant t-warm) before -wait, on the connection the later calls reuse")
	key := flag.String("key", "sk-test", "provider API key sent as a bearer token")
	sweep := flag.Int("stack-sweep", 0, "make this many calls over one raw crypto/tls HTTP/1.1 connection instead, each from a fresh goroutine that first takes more stack than the last, so some Writes and Reads start on a stack that must grow")
	flag.Parse()
	apiKey = *key
	if *sweep > 0 {
		if err := stackSweep(*url, *tenant, *sweep); err != nil {
			fmt.Fprintln(os.Stderr, "sweep failed:", err)
			os.Exit(1)
		}
		fmt.Printf("ok %d\n", *sweep)
		return
	}

	client := &http.Client{Timeout: 30 * time.Second}
	for i := 0; i < *warm; i++ {
		if err := chat(client, *url, "t-warm", *stream); err != nil {
			fmt.Fprintln(os.Stderr, "warm-up call failed:", err)
			os.Exit(1)
		}
	}
	if *waitFile != "" {
		fmt.Println("waiting")
		for {
			if _, err := os.Stat(*waitFile); err == nil {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	time.Sleep(*delay)
	call := func() error { return chat(client, *url, *tenant, *stream) }
	if *until != "" {
		var ok, failed atomic.Int64
		var wg sync.WaitGroup
		for i := 0; i < *conc; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					if _, err := os.Stat(*until); err == nil {
						return
					}
					if err := call(); err != nil {
						failed.Add(1)
						fmt.Fprintln(os.Stderr, "call failed:", err)
					} else {
						ok.Add(1)
					}
				}
			}()
		}
		wg.Wait()
		fmt.Printf("ok %d failed %d\n", ok.Load(), failed.Load())
		if failed.Load() > 0 {
			os.Exit(1)
		}
		return
	}
	if *n < 1 {
		return
	}
	// One call alone first: the connection exists before the concurrent calls share it.
	if err := call(); err != nil {
		fmt.Fprintln(os.Stderr, "call failed:", err)
		os.Exit(1)
	}
	fmt.Println("proto", lastProto.Load())
	var failed atomic.Int64
	work := make(chan struct{})
	var wg sync.WaitGroup
	for i := 0; i < *conc; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range work {
				if err := call(); err != nil {
					failed.Add(1)
					fmt.Fprintln(os.Stderr, "call failed:", err)
				}
			}
		}()
	}
	for i := 1; i < *n; i++ {
		work <- struct{}{}
	}
	close(work)
	wg.Wait()
	if failed.Load() > 0 {
		os.Exit(1)
	}
	fmt.Printf("ok %d\n", *n)
}

// apiKey is the bearer token every call sends (-key).
var apiKey string

// lastProto is the protocol of the last response ("HTTP/1.1", "HTTP/2.0").
var lastProto atomic.Value

// chat makes one call and checks the answer carries usage, so a broken response fails the test.
func chat(client *http.Client, url, tenant string, stream bool) error {
	body := `{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello from go"}]}`
	if stream {
		body = `{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hello from go"}]}`
	}
	req, err := http.NewRequest("POST", url, strings.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("content-type", "application/json")
	req.Header.Set("authorization", "Bearer "+apiKey)
	req.Header.Set("x-tenant-id", tenant)
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	lastProto.Store(resp.Proto)
	if resp.StatusCode != 200 {
		b, _ := io.ReadAll(resp.Body)
		return fmt.Errorf("status %d: %.200s", resp.StatusCode, b)
	}
	var usage struct {
		Usage *struct {
			TotalTokens int `json:"total_tokens"`
		} `json:"usage"`
	}
	if !stream {
		b, err := io.ReadAll(resp.Body)
		if err != nil {
			return err
		}
		if err := json.Unmarshal(b, &usage); err != nil || usage.Usage == nil {
			return fmt.Errorf("no usage in %.200s", b)
		}
		return nil
	}
	sc := bufio.NewScanner(resp.Body)
	seen := false
	for sc.Scan() {
		line := bytes.TrimPrefix(sc.Bytes(), []byte("data: "))
		if bytes.Contains(line, []byte(`"usage":{`)) {
			seen = true
		}
	}
	if err := sc.Err(); err != nil {
		return err
	}
	if !seen {
		return fmt.Errorf("stream without usage")
	}
	return nil
}

// stackSweep makes n calls over one crypto/tls connection (HTTP/1.1 written by hand), the
// write and the read of call i each from a fresh goroutine that first recurses i frames deep. A fresh goroutine has a small stack,
// so across the sweep some (*tls.Conn).Write and Read calls find too little stack at their
// check: morestack grows it and runs their entry again. Each call must still be metered once.
func stackSweep(rawURL, tenant string, n int) error {
	u, err := neturl.Parse(rawURL)
	if err != nil {
		return err
	}
	conn, err := tls.Dial("tcp", u.Host, &tls.Config{NextProtos: []string{"http/1.1"}})
	if err != nil {
		return err
	}
	defer conn.Close()
	if p := conn.ConnectionState().NegotiatedProtocol; p != "http/1.1" {
		return fmt.Errorf("ALPN chose %q, not http/1.1", p)
	}
	fmt.Println("proto HTTP/1.1")
	// Calls alternate tenant and model, so a request reported twice (and paired with the next
	// call's response) bills the wrong tenant and price, which the test sees.
	request := func(i int) string {
		model, suffix := "gpt-4o-mini", "-even"
		if i%2 == 1 {
			model, suffix = "gpt-4o", "-odd"
		}
		body := fmt.Sprintf(`{"model":%q,"messages":[{"role":"user","content":"hello from deep in go"}]}`, model)
		return fmt.Sprintf("POST %s HTTP/1.1\r\nHost: %s\r\ncontent-type: application/json\r\n"+
			"authorization: Bearer %s\r\nx-tenant-id: %s%s\r\ncontent-length: %d\r\n\r\n%s",
			u.RequestURI(), u.Host, apiKey, tenant, suffix, len(body), body)
	}
	// Each call's write and read run in separate fresh goroutines, each (*tls.Conn) method the
	// first deep call of its goroutine: nothing before it grows the stack first.
	write := func(b []byte) error {
		_, err := conn.Write(b)
		return err
	}
	buf := make([]byte, 1<<16)
	read := func() error {
		var got []byte
		for {
			n, err := conn.Read(buf)
			if err != nil {
				return err
			}
			got = append(got, buf[:n]...)
			if done, err := answered(got); done || err != nil {
				return err
			}
		}
	}
	for i := 0; i < n; i++ {
		req := []byte(request(i))
		for _, step := range []func() error{func() error { return write(req) }, read} {
			errc := make(chan error, 1)
			go func() { errc <- deep(i, step) }()
			if err := <-errc; err != nil {
				return fmt.Errorf("call %d: %w", i, err)
			}
		}
	}
	return nil
}

// answered reports whether got holds a whole HTTP/1.1 response (headers and content-length
// bytes of body), and an error for a response that is not a 200 with usage.
func answered(got []byte) (bool, error) {
	end := bytes.Index(got, []byte("\r\n\r\n"))
	if end < 0 {
		return false, nil
	}
	resp, err := http.ReadResponse(bufio.NewReader(bytes.NewReader(got)), nil)
	if err != nil {
		return false, err
	}
	if int64(len(got)-end-4) < resp.ContentLength {
		return false, nil
	}
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return false, err
	}
	if resp.StatusCode != 200 || !bytes.Contains(b, []byte(`"usage"`)) {
		return false, fmt.Errorf("status %d: %.200s", resp.StatusCode, b)
	}
	return true, nil
}

// sink keeps deep's frames from being optimised away.
var sink byte

// deep recurses n frames (each ~80 bytes of stack), then runs f.
//
//go:noinline
func deep(n int, f func() error) error {
	var pad [40]byte
	pad[n%40] = byte(n)
	if n == 0 {
		return f()
	}
	err := deep(n-1, f)
	sink += pad[(n*7)%40]
	return err
}
