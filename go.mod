module github.com/kvrecall/kvrecall

go 1.26.8

require (
	github.com/gen2brain/malgo v0.11.24
	github.com/ollama/ollama v0.17.4
	github.com/stretchr/testify v1.12.1
	github.com/x448/float16 v0.8.4
)

require (
	github.com/dlclark/regexp2 v1.11.4 // indirect
	github.com/emirpasic/gods/v2 v2.0.0-alpha // indirect
	go.yaml.in/yaml/v3 v3.0.5 // indirect
	golang.org/x/image v0.22.0 // indirect
	golang.org/x/sync v0.17.0 // indirect
)
