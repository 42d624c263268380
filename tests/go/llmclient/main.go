// llmclient is the Go test client of the observer's Go tests: a plain net/http client (HTTP/2 by
// default over crypto/tls; GODEBUG=http2client=0 for HTTP/1.1) calling an OpenAI-style chat
// completions endpoint. The CA comes from SSL_CERT_FILE. Standard library only.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
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
	flag.Parse()
	apiKey = *key

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
