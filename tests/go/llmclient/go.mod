module llmwarden.test/llmclient

go 1.19
