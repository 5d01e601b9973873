from align.cli import main

if __name__ == "__main__":  # vLLM spawns workers: entry points must be guarded
    main()
