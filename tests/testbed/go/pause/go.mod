module kvinject.test/pause

go 1.24
