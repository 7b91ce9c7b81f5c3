from vlm_pipeline.commands import main

if __name__ == "__main__":
    main()
